"""DeepPot(model, neighbor_list=...): an ASE neighbour list the caller built, as deepmd-kit's DeepPot takes it.

deepmd-kit's own check (TestDeepPotNeighborList): the same model and frame evaluated with and without the
list give the same results. Here also: half lists, ase's NeighborList wrapper and its older primitive,
open boundaries, frame and atomic parameters, sections cut to sel, and bad lists refused in one line.
"""

from __future__ import annotations

import dataclasses

import pytest

from minidp import DeepPot
from tests.conftest import MODEL_PB, need, rel_err
from tests.test_model_options import EVERYTHING, frames, minidp_model, params

ase = pytest.importorskip("ase")
ase_nl = pytest.importorskip("ase.neighborlist")

from minidp.md.calculator import MiniDPCalculator  # needs ASE: skipped above without it


def lists(natoms: int, cutoff: float):
    """Complete lists of every kind ASE makes: a pair cutoff >= cutoff (skin 0.3 on top)."""
    return {
        "new, both ways (deepmd-kit's test)": ase_nl.NewPrimitiveNeighborList(cutoffs=cutoff, bothways=True,
                                                                              self_interaction=False),
        "new, half, radii": ase_nl.NewPrimitiveNeighborList([cutoff / 2] * natoms),
        "wrapper, self interaction": ase_nl.NeighborList([cutoff / 2] * natoms, self_interaction=True),
        "old primitive, both ways": ase_nl.PrimitiveNeighborList([cutoff / 2] * natoms, bothways=True),
    }


def assert_same(got, want, tol=1e-10):
    for name, a, b in zip(("energy", "force", "virial", "atom energy", "atom virial"), got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, name


def test_a_complete_list_gives_the_models_own_results(water_dp, water_frames):
    coords, cells, types = water_frames
    want = water_dp.eval(coords[:1], cells[:1], types, atomic=True)
    for nl in lists(len(types), water_dp.get_rcut()).values():
        dp = DeepPot(water_dp.model, neighbor_list=nl)
        assert_same(dp.eval(coords[:1], cells[:1], types, atomic=True), want)
        # the centres in several chunks on two threads: each chunk takes its rows of the given list
        chunked = DeepPot(water_dp.model, neighbor_list=nl, batch_size=50, workers=2)
        assert_same(chunked.eval(coords[:1], cells[:1], types, atomic=True), want)
        # the same list object again, at moved positions: it rebuilds itself as its skin says
        moved = coords[1:2]
        assert_same(dp.eval(moved, cells[1:2], types), water_dp.eval(moved, cells[1:2], types))


@pytest.mark.parametrize("periodic", [True, False])
def test_frame_and_atomic_parameters_and_open_boundaries(periodic):
    dp0 = DeepPot(minidp_model(EVERYTHING, 3))
    coords, cells, types = frames(5, nf=1, natoms=9, periodic=periodic)
    fparam, aparam = params(EVERYTHING, 1, 9, 5)
    want = dp0.eval(coords, cells, types, atomic=True, fparam=fparam, aparam=aparam)
    for nl in lists(9, dp0.get_rcut()).values():
        got = DeepPot(dp0.model, neighbor_list=nl).eval(coords, cells, types, atomic=True, fparam=fparam,
                                                         aparam=aparam)
        assert_same(got, want)


def test_sections_beyond_sel_are_cut_to_the_nearest_as_the_search_cuts_them():
    model = minidp_model(EVERYTHING, 4)
    model = dataclasses.replace(model, descriptor=dataclasses.replace(
        model.descriptor, config=dataclasses.replace(model.descriptor.config, sel=(2, 2))))
    dp0 = DeepPot(model)
    coords, cells, types = frames(6, nf=1, natoms=12)
    fparam, aparam = params(EVERYTHING, 1, 12, 6)
    with pytest.warns(UserWarning, match="sel"):
        want = dp0.eval(coords, cells, types, fparam=fparam, aparam=aparam)
    nl = ase_nl.NewPrimitiveNeighborList(cutoffs=4.0, bothways=True, self_interaction=False)
    with pytest.warns(UserWarning, match="sel"):
        got = DeepPot(model, neighbor_list=nl).eval(coords, cells, types, fparam=fparam, aparam=aparam)
    assert_same(got, want)


def test_the_list_names_the_neighbours():
    """A list shorter than rcut leaves out the pairs it does not name: the energy differs, and equals
    that of a model whose cutoff keeps those pairs out only where nothing else changes (zero pairs: isolated atoms)."""
    dp0 = DeepPot(minidp_model(EVERYTHING, 3))
    coords, cells, types = frames(7, nf=1, natoms=6, periodic=False)
    fparam, aparam = params(EVERYTHING, 1, 6, 7)
    empty = ase_nl.NewPrimitiveNeighborList(cutoffs=1e-3, skin=0.0, bothways=True, self_interaction=False)
    e, f, v = DeepPot(dp0.model, neighbor_list=empty).eval(coords, cells, types, fparam=fparam, aparam=aparam)
    # no pair: each atom's energy is its isolated energy, no force, no virial
    far = coords * 100.0
    e_far, _, _ = dp0.eval(far, None, types, fparam=fparam, aparam=aparam)
    assert rel_err(e, e_far) < 1e-12
    assert not f.any() and not v.any()


def test_the_callers_list_is_not_changed(water_dp, water_frames):
    coords, cells, types = water_frames
    nl = ase_nl.NewPrimitiveNeighborList([3.2] * len(types))
    DeepPot(water_dp.model, neighbor_list=nl).eval(coords[:1], cells[:1], types)
    assert nl.bothways is False and nl.self_interaction is True


@pytest.mark.parametrize("make, call, error, message", [
    (lambda n: object(), None, TypeError, "neighbor_list must be an ASE neighbour list"),
    (lambda n: ase_nl.NewPrimitiveNeighborList(cutoffs=6.0), "two frames", ValueError, "one frame"),
    (lambda n: ase_nl.NewPrimitiveNeighborList([3.0] * (n + 1)), "", ValueError, "cutoff radii"),
    (lambda n: ase_nl.NewPrimitiveNeighborList(cutoffs=6.0), "other atoms", ValueError, "was built for"),
])
def test_bad_lists_are_refused_in_one_line(water_dp, water_frames, make, call, error, message):
    coords, cells, types = water_frames
    with pytest.raises(error, match=message) as info:
        dp = DeepPot(water_dp.model, neighbor_list=make(len(types)))
        if call == "two frames":
            dp.eval(coords[:2], cells[:2], types)
        elif call == "other atoms":
            dp.eval(coords[:1], cells[:1], types)
            dp.eval(coords[:1, :-3], cells[:1], types[:-1])
        else:
            dp.eval(coords[:1], cells[:1], types)
    assert "\n" not in str(info.value)


def test_the_ase_calculator_takes_a_list(water_dp, water_frames):
    coords, cells, types = water_frames
    atoms = ase.Atoms(symbols=[water_dp.get_type_map()[t] for t in types], positions=coords[0].reshape(-1, 3),
                      cell=cells[0].reshape(3, 3), pbc=True)
    nl = ase_nl.NewPrimitiveNeighborList(cutoffs=6.0, bothways=True, self_interaction=False)
    atoms.calc = MiniDPCalculator(str(water_dp.model_file), neighbor_list=nl)
    _, f, _ = water_dp.eval(coords[:1], cells[:1], types)
    assert rel_err(atoms.get_forces(), f[0]) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("cutoff, periodic", [(6.0, True), (4.0, True), (2.5, True), (6.0, False)])
def test_equals_deepmd_kits_deeppot_with_the_same_list(water_dp, water_frames, cutoff, periodic):
    """deepmd-kit's TensorFlow DeepPot with the same kind of list: equal also when the list is shorter than
    rcut (4.0, 2.5: the pairs it names are the neighbours), to round-off (1e-12 measured 1e-13)."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    coords, cells, types = water_frames
    cell = cells[:1].astype(float) if periodic else None

    def new_list():
        return ase_nl.NewPrimitiveNeighborList(cutoffs=cutoff, bothways=True, self_interaction=False)

    want = deepmd_infer.DeepPot(str(need(MODEL_PB)), neighbor_list=new_list()).eval(
        coords[:1].astype(float), cell, types, atomic=True)
    got = DeepPot(water_dp.model, neighbor_list=new_list()).eval(coords[:1], cell, types, atomic=True)
    assert_same(got, want, tol=1e-12)
