"""Errors that named the wrong thing (issue 16): frames counted in the whole call, damaged systems named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from minidp.cli import main
from minidp.infer import DeepPot
from tests.test_cli import small_model, small_system  # noqa: F401  (fixtures)


def _frames(nf=80, seed=0):
    rng = np.random.default_rng(seed)
    x = np.tile(np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), (nf, 1, 1)) + rng.normal(0, 0.01, (nf, 3, 3))
    return x, np.tile(np.eye(3) * 10, (nf, 1, 1)), np.array([0, 1, 1])


@pytest.mark.parametrize("batch_size", [3, 9, 10_000])
def test_frames_are_numbered_in_the_whole_call(small_model, batch_size):
    dp = DeepPot(small_model, progress=False, batch_size=batch_size)
    x, cells, types = _frames()
    x[57, 2] = x[57, 1]
    with pytest.raises(ValueError, match=r"atoms 1 and 2 are on the same spot \(frame 57\)"):
        dp.eval(x, cells, types)
    x, cells, types = _frames()
    cells[63, 2] = cells[63, 1]
    with pytest.raises(ValueError, match=r"cell of frame 63 is singular"):
        dp.eval(x, cells, types)


def test_stream_blocks_number_frames_in_the_system(small_model, tmp_path):
    import dpdata

    from minidp.active.stream import stream_eval

    x, cells, types = _frames(20)
    x[13, 2] = x[13, 1]
    data = {"atom_names": ["O", "H"], "atom_numbs": [1, 2], "atom_types": types, "orig": np.zeros(3),
            "cells": cells, "coords": x, "nopbc": False}
    dpdata.System(data=data).to("deepmd/npy", str(tmp_path / "s"), set_size=7)
    with pytest.raises(ValueError, match=r"\(frame 13\)"):
        list(stream_eval(DeepPot(small_model, progress=False), tmp_path / "s", 4))


def test_atom_types_rows_must_match_the_frames(small_model):
    x, cells, types = _frames(2)
    with pytest.raises(ValueError, match=r"atom_types has 3 rows \(one per frame\) but coords holds 2 frames"):
        DeepPot(small_model, progress=False).eval(x, cells, np.tile(types, (3, 1)))


@pytest.mark.parametrize("side", [1e7, 1e8, 1e12])
def test_huge_boxes_do_not_overflow_the_bin_count(small_model, side):
    x, _, types = _frames(1)
    dp = DeepPot(small_model, progress=False)
    e_open = dp.eval(x, None, types)[0]
    # fractional coordinates in a 1e12 A box keep ~4 digits of an Angstrom: the same energy to round-off
    np.testing.assert_allclose(dp.eval(x, np.eye(3)[None] * side, types)[0], e_open, rtol=1e-6)


def _one_line(capsys, text):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_lammps_file_with_more_types_than_t_names(small_model, small_system, tmp_path, capsys):
    import dpdata

    dpdata.System(str(small_system), fmt="deepmd/npy").to("lammps/lmp", str(tmp_path / "conf.lmp"))
    assert main(["eval", "-m", str(small_model), "-s", str(tmp_path / "conf.lmp"), "-f", "lammps/lmp", "-t", "O",
                 "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, "does -t name every atom type of the file? it names ['O']")


@pytest.mark.parametrize("damage, command, text", [
    (lambda s: np.save(s / "set.000" / "box.npy", np.load(s / "set.000" / "box.npy")[:-1]), "eval",
     "set.000/box.npy has shape (2, 9); expected (3, 9) for 3 frames of 9 atoms"),
    (lambda s: (s / "set.000" / "force.npy").write_bytes(b"garbage"), "test",
     "set.000/force.npy is not a readable .npy array"),
    (lambda s: (s / "set.000" / "force.npy").unlink(), "test", "has no force labels"),
])
def test_damaged_systems_are_named(damage, command, text, small_model, small_system, tmp_path, capsys):
    s = tmp_path / "s"
    shutil.copytree(small_system, s)
    damage(s)
    argv = [command, "-m", str(small_model), "-s", str(s)] + (["-o", str(tmp_path / "o")] if command == "eval" else [])
    assert main(argv) == 2
    _one_line(capsys, text)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# Issue 20: arguments of the wrong kind are named with what was expected
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("given, shown", [(123, "int 123"), (None, "NoneType None"), (b"m.dp", "bytes b'm.dp'"),
                                          (1.5, "float 1.5"), (["m.dp"], "list ['m.dp']")])
def test_deeppot_of_something_not_a_path_says_what_it_got(given, shown):
    """DeepPot(123) said 'expected str, bytes or os.PathLike object, not int'."""
    with pytest.raises(TypeError) as err:
        DeepPot(given)
    assert str(err.value) == f"model must be a path to a .dp/.yaml/.yml/.json/.pb/.pth file, got {shown}"
    with pytest.raises(ValueError, match="model must be a path to a .* file, got an empty path"):
        DeepPot("")


@pytest.mark.parametrize("natoms", [0, -3, 2.5, True])
def test_per_atom_deviations_of_no_atoms_are_refused(natoms):
    """virial_deviation(natoms=0) returned NaN: per-atom values of no atoms are 0/0."""
    from minidp.active.model_devi import energy_deviation, virial_deviation

    with pytest.raises(ValueError, match=f"natoms must be a positive integer, got {natoms!r}"):
        virial_deviation(np.zeros((2, 1, 9)), natoms)
    with pytest.raises(ValueError, match=f"natoms must be a positive integer, got {natoms!r}"):
        energy_deviation(np.zeros((2, 1)), natoms)
    assert (virial_deviation(np.zeros((2, 1, 9)), 3) == 0).all()


def test_finite_frames_names_the_first_bad_frame_and_entry():
    from minidp.checks import FrameError, finite_frames

    a = np.zeros((4, 2, 3))
    np.testing.assert_array_equal(finite_frames("f.npy", a), a)
    a[2, 1, 0], a[3, 0, 0] = np.inf, np.nan
    with pytest.raises(FrameError, match=r"^f.npy: frame 2 holds inf \(entry 3 of the frame\); expected finite numbers$") as err:
        finite_frames("f.npy", a)
    assert err.value.shifted(10).args[0].startswith("f.npy: frame 12 holds inf")
    with pytest.raises(ValueError, match=r"^e.npy: frame 1 holds nan; expected finite numbers$"):
        finite_frames("e.npy", np.array([1.0, np.nan]))
