"""DeepPot: agreement with deepmd-kit, chunk-size invariance, kernels against their NumPy twins, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minidp import DeepPot
from minidp.infer import Chunk, bytes_per_atom, plan_chunks
from tests.conftest import MODEL_DP, MODEL_PB, need


def test_shapes_match_deepmd_kit(water_dp, water_frames):
    coords, cells, types = water_frames
    e, f, v, ae, av = water_dp.eval(coords, cells, types, atomic=True)
    assert (e.shape, f.shape, v.shape, ae.shape, av.shape) == ((4, 1), (4, 192, 3), (4, 9), (4, 192, 1), (4, 192, 9))
    assert water_dp.eval_descriptor(coords, cells, types).shape == (4, 192, 1600)
    assert water_dp.get_type_map() == ["O", "H"]
    assert (water_dp.get_rcut(), water_dp.get_ntypes(), water_dp.get_sel()) == (6.0, 2, [46, 92])
    assert (water_dp.get_dim_fparam(), water_dp.get_dim_aparam()) == (0, 0)


def test_agrees_with_deepmd_kit_tensorflow(water_dp, water_frames):
    """The reference: deepmd-kit's own DeepPot on the frozen .pb, to 1e-10 (per atom for e and v)."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    coords, cells, types = water_frames
    ref = deepmd_infer.DeepPot(str(need(MODEL_PB))).eval(coords, cells, types, atomic=True)
    ours = water_dp.eval(coords, cells, types, atomic=True)
    scale = [192, 1, 192, 1, 1]  # energy and virial per atom
    for name, a, b, s in zip("e f v ae av".split(), ours, ref, scale):
        assert np.abs(a - b).max() / s <= 1e-10, name
    D_ref = deepmd_infer.DeepPot(str(MODEL_PB)).eval_descriptor(coords, cells, types)
    assert np.abs(water_dp.eval_descriptor(coords, cells, types) - D_ref).max() <= 1e-10


def test_pb_and_dp_load_the_same_model(water_frames):
    pytest.importorskip("deepmd")
    coords, cells, types = water_frames
    a = DeepPot(need(MODEL_PB)).eval(coords[:1], cells[:1], types)
    b = DeepPot(need(MODEL_DP)).eval(coords[:1], cells[:1], types)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("batch_size", [1, 50, 192, 500, 10_000])
def test_results_do_not_depend_on_chunking(water_frames, batch_size):
    coords, cells, types = water_frames
    ref = DeepPot(need(MODEL_DP), batch_size=192, workers=1).eval(coords, cells, types, atomic=True)
    out = DeepPot(MODEL_DP, batch_size=batch_size, workers=2).eval(coords, cells, types, atomic=True)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_numba_kernels_equal_numpy_twins(water_frames):
    coords, cells, types = water_frames
    a = DeepPot(need(MODEL_DP), backend="numba").eval(coords[:2], cells[:2], types, atomic=True)
    b = DeepPot(MODEL_DP, backend="numpy").eval(coords[:2], cells[:2], types, atomic=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max())


def test_iter_eval_streams_what_eval_returns(water_dp, water_frames):
    coords, cells, types = water_frames
    e, f, v = water_dp.eval(coords, cells, types)
    dp = DeepPot(need(MODEL_DP), batch_size=200)
    seen = 0
    for frames, p in dp.iter_eval(coords, cells, types):
        np.testing.assert_allclose(p.energy, e[frames, 0], rtol=1e-13)
        np.testing.assert_allclose(p.force, f[frames], atol=1e-12)
        seen += p.energy.size
    assert seen == 4


def test_plan_chunks_covers_every_atom_once():
    assert plan_chunks(5, 192, 400) == [Chunk(slice(0, 2), slice(0, 192)), Chunk(slice(2, 4), slice(0, 192)),
                                       Chunk(slice(4, 5), slice(0, 192))]
    chunks = plan_chunks(2, 1000, 300)
    assert [c.atoms for c in chunks[:4]] == [slice(0, 250), slice(250, 500), slice(500, 750), slice(750, 1000)]
    assert len(chunks) == 8
    # one frame, two workers: each gets half of the atoms
    assert plan_chunks(1, 192, 1024, workers=2) == [Chunk(slice(0, 1), slice(0, 96)), Chunk(slice(0, 1), slice(96, 192))]
    # many frames: whole frames, as many as fit
    assert all(c.atoms == slice(0, 192) for c in plan_chunks(40, 192, 1024, workers=2))


def test_plan_chunks_aims_at_the_size_within_the_limit():
    """With a limit above batch_size, a frame a few atoms over a multiple of it is not cut into one more,
    smaller chunk (an MD rank's 770 atoms: 2 chunks of 385, not 3 of 257); the limit still bounds them."""
    assert [c.atoms for c in plan_chunks(1, 770, 384)] == [slice(0, 257), slice(257, 513), slice(513, 770)]
    assert [c.atoms for c in plan_chunks(1, 770, 384, limit=10**6)] == [slice(0, 385), slice(385, 770)]
    assert [c.atoms for c in plan_chunks(1, 770, 384, limit=300)] == [slice(0, 257), slice(257, 513), slice(513, 770)]
    assert plan_chunks(1, 500, 384, limit=10**6) == [Chunk(slice(0, 1), slice(0, 500))]
    # every worker still gets a chunk; whole-frame grouping is unchanged
    assert [c.atoms for c in plan_chunks(1, 770, 384, workers=4, limit=10**6)] == [
        slice(0, 192), slice(192, 385), slice(385, 578), slice(578, 770)]
    assert plan_chunks(5, 192, 400, limit=10**6) == plan_chunks(5, 192, 400)
    for natoms in range(1, 2000, 37):
        chunks = plan_chunks(1, natoms, 384, workers=2, limit=1000)
        assert len(chunks) >= min(2, natoms) and max(c.atoms.stop - c.atoms.start for c in chunks) <= 1000
        assert [c.atoms.start for c in chunks[1:]] == [c.atoms.stop for c in chunks[:-1]]
        assert chunks[0].atoms.start == 0 and chunks[-1].atoms.stop == natoms


def test_default_chunks_aim_at_the_fastest_size(water_dp):
    """A default DeepPot aims at FASTEST_CHUNK atoms per chunk, bounded by its memory budget; a batch_size
    given is a bound."""
    assert water_dp.batch_limit >= water_dp.batch_size
    given = DeepPot(water_dp.model, batch_size=200)
    assert given.batch_limit == given.batch_size == 200


def test_memory_estimate_is_sane(water_dp):
    # a 192-atom water frame needs tens of MB, not kB or GB
    assert 10e6 < 192 * bytes_per_atom(water_dp.model) < 200e6


def test_open_boundary_cluster(water_dp, water_frames):
    """cells=None: no images; the same cluster far inside a huge box gives the same answer."""
    coords, cells, types = water_frames
    x = coords[0].reshape(-1, 3)[:30].astype(np.float64)
    t = types[:30]
    e1, f1, v1 = water_dp.eval(x[None], None, t)
    e2, f2, v2 = water_dp.eval(x[None] + 50.0, np.eye(3)[None] * 200.0, t)
    np.testing.assert_allclose(e1, e2, rtol=1e-12)
    np.testing.assert_allclose(f1, f2, atol=1e-10)
    np.testing.assert_allclose(v1, v2, atol=1e-9)


# ---------------------------------------------------------------------------
# Bad input: an error that names the problem, never silent garbage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c, b, t: (c[:, :-1], b, t), ValueError, r"coords has shape \(4, 575\)"),
    (lambda c, b, t: (np.where(np.arange(c.size).reshape(c.shape) == 7, np.nan, c), b, t), ValueError,
     r"coords has a non-finite entry nan at index \(0, 7\)"),
    (lambda c, b, t: (c, np.full_like(b, np.inf), t), ValueError, r"cells has a non-finite entry inf"),
    (lambda c, b, t: (c, b[:2], t), ValueError, r"cells has shape \(2, 9\); expected \(4, 9\)"),
    (lambda c, b, t: (c, b, np.where(np.arange(t.size) == 3, 2, t)), ValueError,
     r"atom type 2 is outside the model's types 0..1"),
    (lambda c, b, t: (c, b, t.astype(float)), TypeError, r"atom_types must be integers"),
    (lambda c, b, t: (c.astype(str), b, t), TypeError, r"coords must hold real numbers"),
    (lambda c, b, t: (c, np.zeros_like(b), t), ValueError, r"cell of frame 0 is singular"),
])
def test_bad_input_is_named(water_dp, water_frames, mutate, error, match):
    coords, cells, types = mutate(*water_frames)
    with pytest.raises(error, match=match):
        water_dp.eval(coords, cells, types)


def test_two_atoms_on_one_spot(water_dp, water_frames):
    coords, cells, types = water_frames
    x = coords[:1].reshape(1, -1, 3).copy()
    x[0, 5] = x[0, 9]
    with pytest.raises(ValueError, match=r"atoms \d+ and \d+ are on the same spot"):
        water_dp.eval(x, cells[:1], types)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        DeepPot(need(MODEL_DP), batch_size=0)
    with pytest.raises(ValueError, match=r"backend must be one of \['reference', 'numpy', 'numba'\], got 'gpu'"):
        DeepPot(MODEL_DP, backend="gpu")
    with pytest.raises(FileNotFoundError, match=r"model file .*nothing.dp does not exist"):
        DeepPot("nothing.dp")


def test_extras_are_refused(water_dp, water_frames):
    coords, cells, types = water_frames
    with pytest.raises(ValueError, match=r"fparam has shape \(1,\) but this model takes no fparam"):
        water_dp.eval(coords, cells, types, fparam=np.zeros(1))
    with pytest.raises(ValueError, match=r"aparam has shape \(2, 3\) but this model takes no aparam"):
        water_dp.eval(coords, cells, types, aparam=np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bogus'\]"):
        water_dp.eval(coords, cells, types, bogus=1)


# ---------------------------------------------------------------------------
# Frames of no atoms: valid input, as in deepmd-kit's DeepPot
# ---------------------------------------------------------------------------

EXAMPLE_MODEL = Path(__file__).resolve().parents[1] / "minidp" / "examples" / "water" / "model.dp"


@pytest.mark.parametrize("coords, cells, types, nf", [
    (np.zeros((2, 0, 3)), np.eye(3)[None].repeat(2, 0) * 10, np.zeros(0, dtype=int), 2),
    (np.zeros((3, 0)), None, [], 3),  # a plain [] is float64 to NumPy
    (np.zeros(0), np.eye(3) * 10, np.array([]), 1),  # a flat coords is one frame
    (np.zeros((2, 0, 3)), None, np.zeros((2, 0), dtype=int), 2),  # one (empty) row of types per frame
])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_zero_atom_frames(coords, cells, types, nf, backend):
    """Energy 0 (nf, 1), forces (nf, 0, 3), virial zeros (nf, 9), atomic (nf, 0, 1) and (nf, 0, 9),
    descriptors (nf, 0, dim): the shapes deepmd-kit's DeepPot gives."""
    dp = DeepPot(EXAMPLE_MODEL, backend=backend, progress=False)
    e, f, v, ae, av = dp.eval(coords, cells, types, atomic=True)
    assert (e.shape, f.shape, v.shape, ae.shape, av.shape) == ((nf, 1), (nf, 0, 3), (nf, 9), (nf, 0, 1), (nf, 0, 9))
    assert not e.any() and not v.any()
    assert dp.eval_descriptor(coords, cells, types).shape == (nf, 0, dp.get_dim_descriptor())
    (frames, p), = list(dp.iter_eval(coords, cells, types))
    assert frames == slice(0, nf) and p.energy.shape == (nf,) and not p.energy.any()


@pytest.mark.parametrize("coords, cells, match", [
    (np.zeros((2, 1, 3)), None, r"coords has shape \(2, 1, 3\) but atom_types is empty"),
    (np.zeros((0, 0, 3)), None, r"no frames"),
    (np.zeros((2, 0, 3)), np.eye(3)[None] * 10, r"cells has shape \(1, 3, 3\); expected \(2, 9\)"),
])
def test_zero_atom_frames_bad_shapes_are_named(coords, cells, match):
    with pytest.raises(ValueError, match=match):
        DeepPot(EXAMPLE_MODEL, progress=False).eval(coords, cells, [])


def test_zero_atoms_agree_with_deepmd_kit():
    """deepmd-kit's TensorFlow DeepPot on the .pb, one frame of no atoms (it fails on two: a TF graph error)."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    coords, cells, types = np.zeros((1, 0, 3)), np.eye(3)[None] * 10, np.zeros(0, dtype=int)
    ref = deepmd_infer.DeepPot(str(need(MODEL_PB))).eval(coords, cells, types, atomic=True)
    ours = DeepPot(need(MODEL_DP), progress=False).eval(coords, cells, types, atomic=True)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_ase_calculator_on_no_atoms():
    """An empty Atoms() (open, or periodic): energy 0, forces (0, 3), stress 0."""
    pytest.importorskip("ase")
    from ase import Atoms

    from minidp.md.calculator import MiniDPCalculator

    calc = MiniDPCalculator(EXAMPLE_MODEL)
    for atoms in (Atoms(), Atoms(cell=np.eye(3) * 8, pbc=True)):
        atoms.calc = calc
        assert atoms.get_potential_energy() == 0.0
        assert atoms.get_forces().shape == (0, 3) and atoms.get_potential_energies().shape == (0,)
    assert not atoms.get_stress().any()
