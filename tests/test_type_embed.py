"""se_e2_a with a model-level type embedding (minidp.type_embed): the formula's own path against finite
differences, the fold (every backend) against it, the model file, the refusals, compression, and deepmd-kit's fixture
se_e2_a_tebd.pbtxt (when DEEPMD_INFER_DIR names a folder holding deepmd-kit's source/tests/infer)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from minidp import DeepPot
from minidp.cli import main
from minidp.io import legacy_graph
from minidp.io.model_check import TEBD_KEY, check_model_dict, min_nbor_dist
from minidp.io.serialization import load_model, model_from_dict, read_model_dict, save_model
from minidp.model import (FittingInput, FitParams, model_with_type_embedding, new_model, predict_frames,
                          tebd_reference_prediction)
from minidp.neighbor import build_neighbor_list
from minidp.nn import embedding_net, fitting_net
from minidp.se_e2_a import SeAConfig
from minidp.type_embed import TypeEmbedding, type_vectors
from tests.conftest import random_stats, rel_err
from tests.test_compress import TABLE_TOL, TF_TOL, compressed, per_atom_error
from tests.test_model import FLOOR
from tests.test_model_options import FIXTURE_COORD, fd_forces_virial, fixture

TYPE_MAP = ["O", "H"]
NE = 2  # type embedding width: the shared embedding net reads 3 or 5 numbers, its first layer (4) no residual
H = 1e-5


def tebd_model(one_side: bool, seed: int, nfp: int = 0, nap: int = 0, atom_ener=(), exclude=(), per_slot=True):
    """A small random se_e2_a model with a type embedding, nonzero davg (padded slots matter) and a bias;
    davg/dstd drawn per slot, or per type as deepmd-kit's are (per_slot=False, tests.conftest.random_stats)."""
    cfg = SeAConfig(rcut=3.5, rcut_smth=1.0, sel=(20, 24), neuron=(4, 8), axis_neuron=2, type_one_side=one_side)
    rng = np.random.default_rng(seed)
    spec = FittingInput(rng.normal(size=nfp), rng.uniform(0.5, 2.0, nfp), rng.normal(size=nap),
                        rng.uniform(0.5, 2.0, nap))
    te = TypeEmbedding(embedding_net((3, NE), 2, seed=seed),
                       embedding_net(cfg.neuron, 1 + NE * (1 if one_side else 2), seed=seed + 1),
                       fitting_net(cfg.dim_out + NE + spec.width, (6, 6), seed=seed + 2), one_side)
    davg, dstd = random_stats(cfg, rng, per_slot)
    return model_with_type_embedding(TYPE_MAP, cfg, davg, dstd, te, rng.normal(size=2), fitting_input=spec,
                                     atom_ener=atom_ener, atom_exclude_types=exclude)


def frames(seed: int, nf: int = 2, natoms: int = 7):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0.0, 4.0, (nf, natoms, 3))
    cells = np.array([np.diag([4.0, 4.2, 4.4]) + rng.normal(0, 0.1, (3, 3)) for _ in range(nf)])
    types = rng.integers(0, 2, natoms)
    types[:2] = [0, 1]
    return coords, cells, types


def reference(model, coords, cells, types, params=FitParams()):
    nl = build_neighbor_list(coords, cells, types, model.descriptor.config.rcut, model.descriptor.config.sel)
    return tebd_reference_prediction(nl.rij, nl.nlist, types, model, params), nl


CASES = {"one side": dict(one_side=True), "two sides": dict(one_side=False),
         "fparam, aparam, atom_ener, exclusion": dict(one_side=True, nfp=2, nap=1, atom_ener=(None, 0.0),
                                                     exclude=(0,))}


def case_params(kw, nf, natoms, seed):
    rng = np.random.default_rng(seed + 3)
    return FitParams(rng.normal(size=(nf, kw.get("nfp", 0))) if kw.get("nfp") else None,
                     rng.normal(size=(nf, natoms, kw.get("nap", 0))) if kw.get("nap") else None)


@pytest.mark.parametrize("case", CASES)
def test_reference_forces_and_virials_are_the_energy_derivatives(case):
    kw = CASES[case]
    model = tebd_model(seed=1, **kw)
    coords, cells, types = frames(2, nf=1)
    params = case_params(kw, 1, coords.shape[1], 2)
    n = 2 * (coords.shape[1] * 3 + 9)

    def energy(x, c):
        p = FitParams(None if params.fparam is None else np.repeat(params.fparam, n, 0),
                      None if params.aparam is None else np.repeat(params.aparam, n, 0))
        return reference(model, x, c, types, p)[0].energy

    pred, _ = reference(model, coords, cells, types, params)
    force, virial = fd_forces_virial(energy, coords, cells)
    np.testing.assert_allclose(pred.force, force, atol=1e-8)
    np.testing.assert_allclose(pred.virial, virial, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "numpy", "numba"])
@pytest.mark.parametrize("case", CASES)
def test_the_folded_nets_give_the_reference_values_on_every_backend(case, backend):
    kw = CASES[case]
    model = tebd_model(seed=3, **kw)
    coords, cells, types = frames(4)
    params = case_params(kw, 2, coords.shape[1], 4)
    want, nl = reference(model, coords, cells, types, params)
    got = predict_frames(nl.rij, nl.nlist, types, model, backend, params)
    for name in want._fields:
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("suffix", [".dp", ".yaml"])
def test_the_model_file_keeps_the_shared_nets_under_minidps_key(tmp_path, suffix):
    model = tebd_model(False, 5, nfp=1)
    path = tmp_path / f"tebd{suffix}"
    save_model(path, model)
    data = read_model_dict(path)
    assert TEBD_KEY in data["model"] and len(data["model"]["fitting"]["nets"]["networks"]) == 1
    coords, cells, types = frames(6)
    fparam = np.array([[0.3], [-0.2]])
    want = DeepPot(model).eval(coords, cells, types, fparam=fparam)
    got = DeepPot(load_model(path)).eval(coords, cells, types, fparam=fparam)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert load_model(path).options() == ["numb_fparam", "type_embedding"]


def test_a_first_layer_that_adds_its_input_back_is_refused():
    with pytest.raises(ValueError, match=r"^the shared embedding net's first layer \(3 -> 3\) adds its input back"):
        TypeEmbedding(embedding_net((NE,), 2), embedding_net((3, 6), 3, resnet_dt=True),
                      fitting_net(12 + NE, (6,)), True)


def test_training_is_refused():
    model = tebd_model(True, 7)
    with pytest.raises(ValueError, match="^training se_e2_a with a type embedding is not supported"):
        model.params()
    assert model.n_params() == sum(n.n_params() for n in (model.type_embedding.net, model.type_embedding.embedding,
                                                          model.type_embedding.fitting))


def test_eval_typeebd_needs_a_type_embedding():
    model = tebd_model(True, 11)
    np.testing.assert_array_equal(DeepPot(model).eval_typeebd(), type_vectors(model.type_embedding.net))
    plain = new_model(TYPE_MAP, model.descriptor.config, (4,))
    with pytest.raises(ValueError, match="^this model has no type embedding"):
        DeepPot(plain).eval_typeebd()


def test_float32_casts_the_shared_nets():
    model = tebd_model(True, 8).astype(np.float32)
    assert model.type_embedding.fitting.dtype == np.float32 and model.fitting[0].dtype == np.float32
    assert model.descriptor.nets[0, 1].dtype == np.float32


# ---------------------------------------------------------------------------
# deepmd-kit's fixture
# ---------------------------------------------------------------------------

# deepmd-kit's source/tests/tf/test_deeppot_a.py TestTypeEmbed: the type embedding of se_e2_a_tebd.pbtxt
EXPECTED_TYPEEBD = [[-0.4602908199, -0.9440795817, -0.857044451, -0.3448434537, -0.6310194663, -0.9765837147,
                     -0.3945653821, 0.8973716518],
                    [-0.7239568558, -0.9672733137, -0.420987752, -0.4542931277, -0.79586188, -0.9615886543,
                     -0.6864800369, 0.9477863254]]


def test_deepmd_kit_fixture_type_embedding_and_its_pb_through_load_model(tmp_path):
    """The type vectors equal deepmd-kit's; its .pb (which holds a training script, but deepmd-kit's converter
    refuses the model) loads through load_model, and a .dp written from it gives the same energies."""
    pytest.importorskip("tensorflow")
    path = Path(os.environ.get("DEEPMD_INFER_DIR", "/nonexistent")) / "se_e2_a_tebd.pbtxt"
    if not path.is_file():
        pytest.skip("DEEPMD_INFER_DIR does not name a folder holding deepmd-kit's source/tests/infer fixtures")
    model = model_from_dict(legacy_graph.read_legacy_graph(path))
    np.testing.assert_allclose(DeepPot(model).eval_typeebd(), EXPECTED_TYPEEBD, rtol=0, atol=1e-10)
    pb = tmp_path / "se_e2_a_tebd.pb"
    pb.write_bytes(legacy_graph.read_graph_def(path).SerializeToString())
    save_model(tmp_path / "tebd.dp", load_model(pb))
    coords, cells, types = frames(9, natoms=6)
    want = DeepPot(model).eval(coords, cells, types)
    for got in (DeepPot(pb).eval(coords, cells, types), DeepPot(tmp_path / "tebd.dp").eval(coords, cells, types)):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Compressed: the folded nets tabulated (minidp.compress)
# ---------------------------------------------------------------------------


def compressed_case(case: str, seed: int):
    """The model of CASES[case] with deepmd-kit's kind of davg/dstd (one range of s per type, which the tables
    cover), compressed on the frames' smallest neighbour distance; (exact, compressed, frames, parameters)."""
    kw = CASES[case]
    model = tebd_model(seed=seed, per_slot=False, **kw)
    coords, cells, types = frames(seed + 1)
    params = case_params(kw, 2, coords.shape[1], seed + 1)
    return model, compressed(model, coords, cells, types), (coords, cells, types), params


@pytest.mark.parametrize("backend", ["reference", "numpy", "numba"])
@pytest.mark.parametrize("case", CASES)
def test_compressed_equals_the_exact_model_on_every_backend(case, backend):
    """One table per neighbour type (type_one_side) or per pair of types, each the folded net of s; energies,
    forces and virials within the tables' bound of the exact model (test_compress.TABLE_TOL)."""
    model, cm, (coords, cells, types), params = compressed_case(case, 13)
    ntypes = len(TYPE_MAP)
    assert len(cm.descriptor.compress.tables) == (ntypes if CASES[case]["one_side"] else ntypes**2)
    assert cm.type_embedding is model.type_embedding
    nl = build_neighbor_list(coords, cells, types, model.descriptor.config.rcut, model.descriptor.config.sel)
    want = predict_frames(nl.rij, nl.nlist, types, model, backend, params)
    got = predict_frames(nl.rij, nl.nlist, types, cm, backend, params)
    for name in want._fields:
        assert rel_err(getattr(got, name), getattr(want, name), FLOOR) <= TABLE_TOL, name


@pytest.mark.parametrize("suffix", [".dp", ".yaml"])
def test_compressed_model_file_round_trips(tmp_path, suffix):
    """The shared nets under minidp's key, the folded nets' tables in the descriptor's compress entry, the
    smallest neighbour distance at the top: read back to the same tables and the same numbers."""
    _, cm, (coords, cells, types), params = compressed_case("two sides", 14)
    path = tmp_path / f"tebd{suffix}"
    save_model(path, cm)
    data = read_model_dict(path)
    assert TEBD_KEY in data["model"] and len(data["model"]["descriptor"]["embeddings"]["networks"]) == 1
    assert min_nbor_dist(data) == cm.descriptor.compress.min_nbor_dist
    back = load_model(path)
    assert back.options() == ["type_embedding"] and back.descriptor.compress.min_nbor_dist == min_nbor_dist(data)
    for a, b in zip(back.descriptor.compress.tables, cm.descriptor.compress.tables, strict=True):
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.info, b.info)
    for x, y in zip(DeepPot(back).eval(coords, cells, types), DeepPot(cm).eval(coords, cells, types)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


def test_a_compressed_file_with_a_table_short_is_refused_at_load(tmp_path):
    """One table per folded net (per pair of types here), though the file holds one shared embedding net."""
    _, cm, _, _ = compressed_case("two sides", 16)
    save_model(tmp_path / "c.dp", cm)
    data = read_model_dict(tmp_path / "c.dp")
    data["model"]["descriptor"]["compress"]["@variables"]["compress_info"].pop()
    with pytest.raises(ValueError, match=r"^c.dp: model.descriptor.compress.@variables.compress_info: 3 tables, "
                                         r"expected 4 \(one per pair of types\)$"):
        check_model_dict(data, "c.dp")


def test_compress_and_info_on_the_command_line(tmp_path, capsys):
    """`minidp compress` of a type-embedding model: the tables compress_descriptor builds, DeepPot reads the file."""
    model, cm, (coords, cells, types), _ = compressed_case("one side", 15)
    save_model(tmp_path / "m.dp", model)
    rmin = cm.descriptor.compress.min_nbor_dist
    assert main(["compress", "-i", str(tmp_path / "m.dp"), "-o", str(tmp_path / "c.dp"),
                 "--min-nbor-dist", repr(rmin)]) == 0
    assert "2 tables of" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "c.dp")]) == 0
    out = capsys.readouterr().out
    assert "type_embedding" in out and "compressed   yes: 2 tables" in out
    back = load_model(tmp_path / "c.dp")
    for a, b in zip(back.descriptor.compress.tables, cm.descriptor.compress.tables, strict=True):
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.info, b.info)
    want = DeepPot(cm).eval(coords, cells, types, atomic=True)
    for dp in (DeepPot(tmp_path / "c.dp"), DeepPot(tmp_path / "c.dp", backend="numpy", batch_size=3, workers=2)):
        for x, y in zip(dp.eval(coords, cells, types, atomic=True), want, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    assert main(["compress", "-i", str(tmp_path / "c.dp"), "-o", str(tmp_path / "d.dp")]) == 2
    assert "already compressed" in capsys.readouterr().err and not (tmp_path / "d.dp").exists()


def test_deepmd_kit_fixture_compressed_against_tensorflows_exact_model(tmp_path, capsys):
    """`minidp compress -i se_e2_a_tebd.pb` (TF's range, the graph's min_nbor_dist) and DeepPot on the .dp it
    writes: within what minidp's compressed water model shows against deepmd-kit TF (test_compress.TF_TOL),
    against deepmd-kit TF's DeepPot on the exact graph (deepmd-kit cannot compress this model)."""
    pytest.importorskip("tensorflow")
    from deepmd.infer import DeepPot as DeepmdPot

    pb = tmp_path / "tebd.pb"
    pb.write_bytes(legacy_graph.read_graph_def(fixture("se_e2_a_tebd.pbtxt")).SerializeToString())
    out = tmp_path / "tebd-compressed.dp"
    assert main(["compress", "-i", str(pb), "-o", str(out)]) == 0
    assert "(tf range)" in capsys.readouterr().out
    dp, tf = DeepPot(out), DeepmdPot(str(pb))
    assert dp.eval_typeebd().shape == (2, 8)
    types = [0, 1, 1, 0, 1, 1]
    for box in (np.eye(3).reshape(1, 9) * 13.0, None):
        ref = tf.eval(np.reshape(FIXTURE_COORD, (1, -1)), box, types, atomic=True)
        ours = dp.eval(np.reshape(FIXTURE_COORD, (1, -1)), box, types, atomic=True)
        for name, err in per_atom_error(ours, ref, len(types)).items():
            assert err <= TF_TOL, name
