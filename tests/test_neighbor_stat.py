"""neighbor_stat against a brute force over all pairs and images, auto sel, and deepmd-kit's NumPy statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from minidp.active.neighbor_stat import auto_sel, neighbor_stat


def _write(folder, coords, cells, types, names=("A", "B")):
    s = folder / "set.000"
    s.mkdir(parents=True)
    np.save(s / "coord.npy", coords.reshape(len(coords), -1))
    np.save(s / "box.npy", cells.reshape(len(cells), 9))
    np.savetxt(folder / "type.raw", types, fmt="%d")
    (folder / "type_map.raw").write_text("\n".join(names) + "\n")
    return str(folder)


def brute_force(coords, cells, types, rcut, ntypes):
    """Every pair and every image within a few cells: (min distance within rcut, max count per type)."""
    d_min, counts = 10.0, np.zeros(ntypes, int)
    for x, h in zip(coords, cells):
        for i in range(len(x)):
            c = np.zeros(ntypes, int)
            for j, n in itertools.product(range(len(x)), itertools.product(range(-2, 3), repeat=3)):
                if i == j and n == (0, 0, 0):
                    continue
                r = np.linalg.norm(x[j] + np.array(n) @ h - x[i])
                if r < rcut:
                    c[types[j]] += 1
                    d_min = min(d_min, r)
            counts = np.maximum(counts, c)
    return d_min, counts


def test_against_brute_force_in_small_blocks(tmp_path):
    """A small skewed cell where atoms see images of themselves; blocks of 2 frames; sel grown from a low guess."""
    rng = np.random.default_rng(0)
    cells = np.array([[[4.0, 0, 0], [1.0, 4.5, 0], [0.5, 0.3, 5.0]]] * 5) * rng.uniform(0.9, 1.1, (5, 1, 1))
    coords = rng.uniform(0, 4, (5, 8, 3))
    types = np.array([0, 1, 1, 0, 1, 1, 0, 1])
    path = _write(tmp_path / "s", coords, cells, types)
    stat = neighbor_stat([path], 4.0, frames_per_block=2)
    d, c = brute_force(coords, cells, types, 4.0, 2)
    assert stat.max_nbor_size == c.tolist()
    assert abs(stat.min_nbor_dist - d) < 1e-12


def test_against_deepmd_numpy(tmp_path):
    """deepmd-kit's own (NumPy backend) neighbour statistics on the same data."""
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.utils.neighbor_stat import NeighborStatOP

    rng = np.random.default_rng(1)
    cells = np.tile(np.eye(3) * 6.0, (3, 1, 1))
    coords = rng.uniform(0, 6, (3, 20, 3))
    types = rng.integers(0, 2, 20)
    path = _write(tmp_path / "s", coords, cells, types)
    min_r2, max_n = NeighborStatOP(2, 3.5, False)(coords.reshape(3, -1), np.tile(types, (3, 1)), cells.reshape(3, 9))
    stat = neighbor_stat([path], 3.5)
    assert stat.max_nbor_size == np.max(max_n, axis=0).tolist()
    assert abs(stat.min_nbor_dist - np.sqrt(np.min(min_r2))) < 1e-10


def test_auto_sel_rule():
    """deepmd-kit's update_sel: floor(count * factor), rounded up to a multiple of 4."""
    assert auto_sel("auto", [38, 72]) == [44, 80]  # 41.8 -> 41 -> 44; 79.2 -> 79 -> 80
    assert auto_sel("auto:1.5", [38, 72]) == [60, 108]
    assert auto_sel("auto:1", [40, 0]) == [40, 0]
    assert auto_sel([46, 92], [38, 72]) is None
    with pytest.raises(ValueError, match="'auto' or 'auto:FACTOR', got 'automatic'"):
        auto_sel("automatic", [1])
    with pytest.raises(ValueError, match="factor of sel 'auto:x' is not a number"):
        auto_sel("auto:x", [1])


def test_auto_sel_matches_deepmd():
    pytest.importorskip("deepmd")
    from deepmd.utils.update_sel import BaseUpdateSel

    class Rule(BaseUpdateSel):  # only its pure helpers are used
        neighbor_stat = None

    rule = Rule()
    for sel, counts in (("auto", [38, 72]), ("auto:1.23", [17, 5, 101])):
        assert auto_sel(sel, counts) == [int(rule.wrap_up_4(n * rule.parse_auto_sel_ratio(sel))) for n in counts]


# ---------------------------------------------------------------------------
# Bad input: one line naming the option, or the system and the frame
# ---------------------------------------------------------------------------


def _good(tmp_path, nframes=5):
    rng = np.random.default_rng(2)
    cells = np.tile(np.eye(3) * 5.0, (nframes, 1, 1))
    return cells, rng.uniform(0, 5, (nframes, 6, 3)), np.array([0, 1, 1, 0, 1, 1])


@pytest.mark.parametrize("rcut, message", [(np.inf, "rcut: inf is not finite"), (np.nan, "rcut: nan is not finite"),
                                           (-1.0, "rcut: -1.0 is not positive"), (0, "rcut: 0 is not positive"),
                                           ("6", "rcut: expected a number, got str '6'")])
def test_bad_rcut_is_refused(rcut, message, tmp_path):
    cells, coords, types = _good(tmp_path)
    path = _write(tmp_path / "s", coords, cells, types)
    with pytest.raises((ValueError, TypeError)) as err:
        neighbor_stat([path], rcut)
    assert str(err.value) == message


@pytest.mark.parametrize("argv, message", [(["-r", "inf"], "rcut: inf is not finite"),
                                           (["-t", "A", "A", "B"], "type_map: 'A' appears 2 times")])
def test_cli_refuses_bad_options_in_one_line(argv, message, tmp_path, capsys):
    """-r inf was an OverflowError traceback; -t O O H was accepted."""
    from minidp.cli import main

    cells, coords, types = _good(tmp_path)
    path = _write(tmp_path / "s", coords, cells, types)
    assert main(["neighbor-stat", "-s", path, *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"minidp neighbor-stat: error: {message}"]


def _bad_frame(kind: str, cells, coords):
    if kind == "nan cell":
        cells[3, 1, 1] = np.nan
    elif kind == "nan coord":
        coords[3, 4, 0] = np.nan
    elif kind == "singular cell":
        cells[3] = [[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]]
    else:  # an atom written twice
        coords[3, 2] = coords[3, 0]
    # a NaN is refused by the reader itself, naming the file and the frame (minidp.io.systems)
    return {"nan cell": "box.npy: frame 3 (frame 3 of the system) holds nan",
            "nan coord": "coord.npy: frame 3 (frame 3 of the system) holds nan",
            "singular cell": "cell of frame 3 is singular",
            "same spot": "frame 3"}[kind]


@pytest.mark.parametrize("kind", ["nan cell", "nan coord", "singular cell", "same spot"])
@pytest.mark.parametrize("frames_per_block, max_slots", [(2, None), (64, 1)])
def test_a_bad_frame_is_named_with_its_system_and_index(kind, frames_per_block, max_slots, tmp_path, monkeypatch):
    """`cannot convert float NaN to integer` / OverflowError before; frame 3 sits in the second block of 2
    frames, or in the fourth run of one frame when the neighbour list is capped (MAX_SLOTS)."""
    import minidp.active.neighbor_stat as ns

    if max_slots is not None:
        monkeypatch.setattr(ns, "MAX_SLOTS", max_slots)
    cells, coords, types = _good(tmp_path)
    message = _bad_frame(kind, cells, coords)
    path = _write(tmp_path / "bad", coords, cells, types)
    with pytest.raises(ValueError) as err:
        neighbor_stat([path], 3.0, frames_per_block=frames_per_block)
    assert str(err.value).startswith((f"system {path}: ", f"{path}/set.000/")) and message in str(err.value), \
        str(err.value)


def test_training_with_sel_auto_names_the_bad_frame(tmp_path):
    """sel: "auto" reads the training systems through the same code."""
    from minidp.training.config import parse_input
    from tests.test_train import _input

    cells, coords, types = _good(tmp_path)
    _bad_frame("singular cell", cells, coords)
    _write(tmp_path / "sys_a", coords, cells, types, names=("O", "H"))
    d = _input()
    d["model"]["descriptor"]["sel"] = "auto"
    d["training"]["training_data"]["systems"] = ["sys_a"]
    d["training"].pop("validation_data")
    with pytest.raises(ValueError, match=r"system \S*sys_a: cell of frame 3 is singular"):
        parse_input(d, tmp_path)


@pytest.mark.parametrize("max_slots", [1, 40, 10**9])
def test_a_capped_neighbour_list_gives_the_same_statistics(max_slots, tmp_path, monkeypatch):
    """A large rcut makes the neighbour list of a block large (rcut 20 A on 192 waters: 5000 slots per
    atom, 6 GB for 64 frames): the block is cut into runs of frames of at most MAX_SLOTS slots."""
    import minidp.active.neighbor_stat as ns

    monkeypatch.setattr(ns, "MAX_SLOTS", max_slots)
    rng = np.random.default_rng(3)
    cells = np.tile(np.eye(3) * 4.5, (5, 1, 1))
    coords = rng.uniform(0, 4.5, (5, 6, 3))
    types = np.array([0, 1, 1, 0, 1, 1])
    stat = neighbor_stat([_write(tmp_path / "s", coords, cells, types)], 4.0, frames_per_block=3)
    d, c = brute_force(coords, cells, types, 4.0, 2)
    assert stat.max_nbor_size == c.tolist() and abs(stat.min_nbor_dist - d) < 1e-12
