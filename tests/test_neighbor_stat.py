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
