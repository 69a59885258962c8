"""model_devi: the deviations against their definitions and deepmd-kit's functions, the file format, the ensemble."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.active import model_devi as md
from minidp.infer import DeepPot
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import save_model
from tests.conftest import random_model


def _draw(seed: int, nm: int, nf: int, natoms: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nm, nf)), rng.normal(size=(nm, nf, natoms, 3)), rng.normal(size=(nm, nf, 9))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(1, 4), st.integers(1, 6))
def test_definitions_by_loops(seed, nm, nf, natoms):
    """Each column from its formula, written with explicit loops over frames, atoms and components."""
    E, F, W = _draw(seed, nm, nf, natoms)
    cols = md.deviation_columns(E, F, W, atomic=True)
    for f in range(nf):
        eps_f = [np.sqrt(sum(np.var(F[:, f, i, c]) for c in range(3))) for i in range(natoms)]
        eps_v = [np.std(W[:, f, c] / natoms) for c in range(9)]
        expect = [max(eps_v), min(eps_v), np.sqrt(np.mean(np.square(eps_v))), max(eps_f), min(eps_f),
                  np.mean(eps_f), np.std(E[:, f] / natoms), *eps_f]
        np.testing.assert_allclose(cols[f], expect, rtol=1e-12, atol=1e-15)


def test_relative_v_is_per_component():
    """--relative_v divides each component by |its mean| + L (deepmd-kit's C++), not by the 9-vector's norm."""
    E, F, W = _draw(1, 4, 3, 5)
    eps = md.virial_deviation(W, 5, relative_v=0.5)
    np.testing.assert_allclose(eps, np.std(W / 5, axis=0) / (np.abs(np.mean(W / 5, axis=0)) + 0.5), rtol=1e-14)


def test_identical_models_deviate_by_zero():
    E, F, W = _draw(2, 1, 3, 4)
    cols = md.deviation_columns(np.repeat(E, 3, 0), np.repeat(F, 3, 0), np.repeat(W, 3, 0))
    assert cols.shape == (3, 7) and np.abs(cols).max() < 1e-15


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"forces must have shape \(nmodels, nframes, natoms, 3\), got \(2, 3\)"):
        md.force_deviation(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"virials must have shape \(nmodels, nframes, 9\)"):
        md.virial_deviation(np.zeros((2, 3, 8)), 4)


@pytest.mark.parametrize("relative", [None, 1.0])
@pytest.mark.parametrize("real", [False, True])
def test_against_deepmd_functions(relative, real):
    """deepmd-kit's calc_model_devi_f/_v/_e on the same arrays (relative_v left out: see the module docstring)."""
    dmd = pytest.importorskip("deepmd.infer.model_devi")
    E, F, W = _draw(3, 4, 5, 6)
    rng = np.random.default_rng(4)
    labels = {"energy": rng.normal(size=5), "force": rng.normal(size=(5, 6, 3)), "virial": rng.normal(size=(5, 9))}
    ours = md.deviation_columns(E, F, W, relative=relative, real=labels if real else None, atomic=True)
    ref = (lambda k, d=6: labels[k] / d) if real else (lambda k, d=6: None)
    v = dmd.calc_model_devi_v(W / 6, ref("virial"))
    f = dmd.calc_model_devi_f(F, labels["force"] if real else None, relative=relative, atomic=True)
    e = dmd.calc_model_devi_e(E[..., None] / 6, None if not real else labels["energy"][:, None] / 6)
    np.testing.assert_allclose(ours[:, :3], np.stack(v, 1), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ours[:, 3:6], np.stack(f[:3], 1), rtol=1e-13)
    np.testing.assert_allclose(ours[:, 6], e, rtol=1e-13)
    np.testing.assert_allclose(ours[:, 7:], f[3], rtol=1e-13)


@pytest.mark.parametrize("atomic", [False, True])
def test_file_is_deepmd_kits(tmp_path, atomic):
    """Byte for byte what deepmd-kit's write_model_devi_out writes, and appended to as it appends."""
    dmd = pytest.importorskip("deepmd.infer.model_devi")
    E, F, W = _draw(5, 3, 4, 2)
    cols = md.deviation_columns(E, F, W, atomic=atomic)
    steps = np.arange(4) * 10
    for _ in range(2):
        dmd.write_model_devi_out(np.column_stack([steps, cols]), str(tmp_path / "dp.out"), header="sys", atomic=atomic)
        md.write_model_devi(tmp_path / "minidp.out", [("sys", steps, cols)], atomic=atomic)
    assert (tmp_path / "minidp.out").read_text() == (tmp_path / "dp.out").read_text()


# ---------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------

CFG = SeAConfig(rcut=3.0, rcut_smth=1.0, sel=(12, 12), neuron=(4, 8), axis_neuron=2, type_one_side=True)


def _frames(nf=3, natoms=10, seed=0):
    rng = np.random.default_rng(seed)
    cells = np.tile(np.eye(3) * 5.0, (nf, 1, 1))
    return rng.uniform(0, 5, (nf, natoms, 3)), cells, rng.integers(0, 2, natoms)


def test_ensemble_equals_separate_evaluations():
    """Sharing neighbour lists (same rcut, sel) and not (a third model with another sel) changes nothing."""
    from dataclasses import replace

    models = [random_model(CFG, 1), random_model(CFG, 2), random_model(replace(CFG, sel=(13, 13)), 3)]
    ens = md.Ensemble(models, batch_size=15)  # 15 atoms per chunk: 10-atom frames, one frame each
    assert ens.groups == [[0, 1], [2]]
    coords, cells, types = _frames()
    r = ens.eval(coords, cells, types, atomic=True)
    for k, m in enumerate(models):
        e, f, v = DeepPot(m).eval(coords, cells, types)
        np.testing.assert_allclose(r.energy[k], e[:, 0], rtol=1e-12)
        np.testing.assert_allclose(r.force[k], f, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.virial[k], v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.devi, md.deviation_columns(r.energy, r.force, r.virial, atomic=True))


def test_ensemble_big_frames_split_over_atoms():
    """Frames larger than a chunk are cut over their centre atoms; each model's shares add up."""
    models = [random_model(CFG, 1), random_model(CFG, 2)]
    coords, cells, types = _frames(2, 12)
    whole = md.Ensemble(models).predict(coords, cells, types)
    split = md.Ensemble(models, batch_size=5).predict(coords, cells, types)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ensemble_refuses_type_maps_and_one_model():
    a = random_model(CFG, 1)
    b = random_model(CFG, 2)
    b.type_map = ["X", "Y"]
    with pytest.raises(ValueError, match=r"different type maps"):
        md.Ensemble([a, b])
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        md.Ensemble([a])


def test_cli_writes_one_block_per_system(tmp_path):
    """minidp model-devi end to end on two small deepmd/npy systems and two saved models."""
    from minidp.cli import main

    paths = []
    for k in (1, 2):
        save_model(tmp_path / f"m{k}.dp", random_model(CFG, k))
        paths.append(str(tmp_path / f"m{k}.dp"))
    for name, nf in (("a", 3), ("b", 2)):
        coords, cells, types = _frames(nf, 10, seed=nf)
        s = tmp_path / "data" / name / "set.000"
        s.mkdir(parents=True)
        np.save(s / "coord.npy", coords.reshape(nf, -1))
        np.save(s / "box.npy", cells.reshape(nf, 9))
        np.savetxt(s.parent / "type.raw", types, fmt="%d")
        (s.parent / "type_map.raw").write_text("T0\nT1\n")
    out = tmp_path / "model_devi.out"
    assert main(["model-devi", "-m", *paths, "-s", str(tmp_path / "data"), "-o", str(out), "-f", "5"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == f"# {tmp_path / 'data' / 'a'}" and lines[1].startswith("# step      max_devi_v")
    assert [int(x.split()[0]) for x in lines[2:5]] == [0, 5, 10] and lines[5] == f"# {tmp_path / 'data' / 'b'}"
    assert len(lines) == 9


def test_example_selects_between_trust_levels():
    """examples/active_learning.py: accurate < lo <= candidate < hi <= failed, as DP-GEN classifies."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("al_example", ROOT / "examples" / "active_learning.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    classes = example.select(np.array([0.05, 0.1, 0.2, 0.3, 0.35]), 0.1, 0.3)
    assert {k: v.tolist() for k, v in classes.items()} == {"accurate": [0], "candidate": [1, 2], "failed": [3, 4]}
    with pytest.raises(ValueError, match="lo < hi, got lo = 0.3, hi = 0.1"):
        example.select(np.zeros(2), 0.3, 0.1)
