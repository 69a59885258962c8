"""change-bias: the modes against their least-squares definitions and deepmd-kit's change_energy_bias_lower."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from minidp import DeepPot
from minidp.active.change_bias import bias_from_data, change_bias
from minidp.cli import main
from minidp.io.serialization import load_model, read_min_nbor_dist, save_model
from tests.test_train_systems import systems_dir  # noqa: F401 (the fixture)
from tests.test_train import SMALL
from tests.conftest import random_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cb") / "m.dp"
    model = random_model(SMALL, 5, fitting_neuron=(8, 8))
    model.type_map = ["O", "H"]
    save_model(path, model, min_nbor_dist=0.9)
    return path


def _names(root):
    return [str(root / n) for n in ("box_a", "box_b", "cluster")]


def test_modes_are_least_squares(systems_dir, model_file):  # noqa: F811
    """change: b + argmin |N d - (E - P)|; set: argmin |N b - E|; rows one per frame. Water's compositions are
    proportional (rank 1): the minimum-norm solution, the pseudo-inverse's."""
    from minidp.io.systems import lazy_system, read_frames

    dp = DeepPot(model_file)
    N, E, P = [], [], []
    for path in _names(systems_dir):
        lazy = lazy_system(path)
        block = read_frames(lazy, 0, lazy.nframes)
        N += [np.bincount(lazy.atom_types, minlength=2)] * lazy.nframes
        E += list(block.labels["energy"])
        P += list(dp.eval(block.coords, block.cells, lazy.atom_types)[0][:, 0])
    N, E, P = np.array(N, float), np.array(E), np.array(P)
    d = np.linalg.pinv(N) @ (E - P)
    np.testing.assert_allclose(bias_from_data(dp, _names(systems_dir), "change"), dp.model.bias + d, rtol=1e-10)
    np.testing.assert_allclose(bias_from_data(dp, _names(systems_dir), "set"), np.linalg.pinv(N) @ E,
                               rtol=1e-10)


@pytest.mark.parametrize("mode", ["change", "set"])
def test_against_deepmd_change_energy_bias_lower(systems_dir, model_file, mode):  # noqa: F811
    """deepmd-kit's own bias update (TensorFlow's change-bias calls it) fed minidp's DeepPot, all frames
    (deepmd-kit shuffles its test frames, so "the first n" differ).

    On systems of one set.* folder: deepmd-kit's TensorFlow path reads only the last set of a system (its
    test set), minidp every set (as deepmd-kit's PyTorch path).
    """
    pytest.importorskip("deepmd")
    from deepmd.tf.fit.ener import change_energy_bias_lower
    from deepmd.utils.data_system import DeepmdDataSystem

    names = _names(systems_dir)[1:]
    data = DeepmdDataSystem(names, batch_size=1, test_size=10, rcut=None, type_map=["O", "H"])
    data.add("energy", 1, atomic=False, must=True, high_prec=True)
    dp = DeepPot(model_file)
    theirs = change_energy_bias_lower(data, dp, ["O", "H"], ["O", "H"], dp.model.bias.copy(),
                                      bias_adjust_mode=f"{mode}-by-statistic", ntest=0)
    np.testing.assert_allclose(bias_from_data(dp, names, mode, numb_batch=0), theirs.ravel(),
                               rtol=1e-10)


def test_cli_writes_the_model(systems_dir, model_file, tmp_path):  # noqa: F811
    out = tmp_path / "new.dp"
    assert main(["change-bias", str(model_file), "-s", str(systems_dir), "-o", str(out), "-m", "set"]) == 0
    assert read_min_nbor_dist(out) == 0.9
    np.testing.assert_allclose(load_model(out).bias, bias_from_data(DeepPot(model_file), _names(systems_dir), "set"))
    assert main(["change-bias", str(model_file), "-b", "-1.5", "2", "-o", str(out), "--overwrite"]) == 0
    assert load_model(out).bias.tolist() == [-1.5, 2.0]


def test_bad_input_is_named(model_file, tmp_path):
    with pytest.raises(ValueError, match=r"-b gives 3 values; expected one per type of the model's type map"):
        change_bias(model_file, tmp_path / "x.dp", bias_value=[1, 2, 3])
    with pytest.raises(ValueError, match="mode must be 'change' or 'set', got 'reset'"):
        bias_from_data(SimpleNamespace(get_ntypes=lambda: 2), [], "reset")
    assert not (tmp_path / "x.dp").exists()


@pytest.mark.parametrize("values, message", [
    (["nan", "nan"], "bias_value (-b): nan at index (0,); expected finite numbers"),
    (["1", "inf"], "bias_value (-b): inf at index (1,); expected finite numbers"),
    (["1e307", "1"], "bias_value (-b): 1e+307 at index 0 is beyond +-1e+10; expected a per-atom energy"),
    (["-20000000000.0", "1"], "bias_value (-b): -2e+10 at index 0 is beyond +-1e+10"),
])
def test_a_bias_the_model_checker_would_refuse_is_never_written(values, message, model_file, tmp_path, capsys):
    """-b nan nan wrote a model that `minidp info` then refused: the same rule (model_check.check_bias) up front."""
    out = tmp_path / "x.dp"
    assert main(["change-bias", str(model_file), "-b", *values, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_the_largest_bias_accepted_is_written_and_loads(model_file, tmp_path):
    out = tmp_path / "x.dp"
    assert main(["change-bias", str(model_file), "-b", "-10000000000.0", "1e10", "-o", str(out)]) == 0
    assert main(["info", str(out)]) == 0 and load_model(out).bias.tolist() == [-1e10, 1e10]


def test_numb_batch_and_bias_values_are_checked(systems_dir, model_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "x.dp"
    assert main(["change-bias", str(model_file), "-s", str(systems_dir), "-n", "-1", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "minidp change-bias: error: numb_batch (-n): -1 is below 0"
    with pytest.raises(TypeError, match=r"bias_value \(-b\): expected an array of numbers"):
        change_bias(model_file, out, bias_value=["a", "b"])
    with pytest.raises(TypeError, match=r"numb_batch \(-n\): expected an integer, got float 1.5"):
        change_bias(model_file, out, [systems_dir], numb_batch=1.5)
    assert not out.exists()
