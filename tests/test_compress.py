"""Compressed models (minidp.compress): the tables, the tabulated paths, and deepmd-kit's own compression."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.cli import main
from minidp.compress import (
    Compression,
    Table,
    _embedding_net,
    build_table,
    compress_descriptor,
    grid_counts,
    hermite_coefficients,
    locate,
    net_derivatives,
    table_features,
    table_grid,
)
from minidp.infer import DeepPot
from minidp.neighbor import build_neighbor_list
from minidp.io.serialization import load_model, min_nbor_dist, model_bytes, model_from_dict, model_to_dict, read_model_dict, save_model
from tests.conftest import MODEL_DP, MODEL_PB, need, random_model, rel_err, se_configs
from tests.test_model import FLOOR, TOL, H, energy, make, predict, specs, strained


# compressed against exact (rel_err, forces with FLOOR): the bound the tables keep on these small models
TABLE_TOL = 1e-6
# minidp's compressed water model (its own tables, TF's range) against deepmd-kit TF, per atom
# (per_atom_error): TF's round-off of its tables
TF_TOL = 5e-12


def per_atom_error(ours, ref, natoms: int) -> dict[str, float]:
    """max |ours - ref| of DeepPot.eval(..., atomic=True)'s e, f, v, ae, av; e and v divided by natoms,
    as validation.compare reports them."""
    per_atom = (natoms, 1, natoms, 1, 1)
    return {name: float(np.abs(x - y).max() / n) for name, x, y, n in zip(("e", "f", "v", "ae", "av"), ours, ref,
                                                                            per_atom, strict=True)}


def compressed(model, coords, cells, types, step=0.01):
    """The model with its nets tabulated on the grid of the frame's smallest neighbour distance."""
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, cfg.sel)
    r = np.linalg.norm(nl.rij, axis=-1)[nl.nlist >= 0]
    rmin = float(r.min()) if r.size else 1.0
    return dataclasses.replace(model, descriptor=compress_descriptor(model.descriptor, rmin, step))


# ---------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(cfg=se_configs(), seed=st.integers(0, 100))
def test_net_derivatives_match_central_differences(cfg, seed):
    net = _embedding_net(random_model(cfg, seed).descriptor, 0, 0)
    s = np.linspace(-2.0, 4.0, 13)[:, None]
    _, dG, d2G = net_derivatives(net, s)
    h = 1e-5
    (Gp, dGp, _), (Gm, dGm, _) = net_derivatives(net, s + h), net_derivatives(net, s - h)
    assert rel_err(dG, (Gp - Gm) / (2 * h)) <= 1e-8
    assert rel_err(d2G, (dGp - dGm) / (2 * h)) <= 1e-8


def _ends(coef: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Value, first and second derivative of each piece's quintic at its right end: (3, nspline, ng)."""
    k = np.arange(6)
    t = h[:, None, None]
    v = (coef * t**k).sum(-1)
    d = (coef[..., 1:] * k[1:] * t ** (k[1:] - 1)).sum(-1)
    d2 = (coef[..., 2:] * k[2:] * (k[2:] - 1) * t ** (k[2:] - 2)).sum(-1)
    return np.stack([v, d, d2])


@settings(max_examples=15, deadline=None)
@given(cfg=se_configs(), seed=st.integers(0, 100), step=st.sampled_from([0.05, 0.01]))
def test_table_is_c2_at_the_nodes_and_at_the_stride_change(cfg, seed, step):
    """Each piece ends where the next starts with the same value, slope and curvature, the nodes'
    net values and derivatives; the first table's last piece meets the second's first too."""
    net = _embedding_net(random_model(cfg, seed).descriptor, 0, 0)
    table = build_table(net, -1.0, 3.0, step, 5.0)
    x, h = table_grid(-1.0, 3.0, step, 10 * step, 5.0)
    right = _ends(table.coef, h)
    # (3, nspline - 1, ng): the next piece's start is its a0, a1, 2 a2
    left = np.stack([table.coef[1:, :, 0], table.coef[1:, :, 1], 2 * table.coef[1:, :, 2]])
    exact = np.stack(net_derivatives(net, x[:, None]))
    for order in range(3):
        scale = max(np.abs(exact[order]).max(), 1.0)
        assert np.abs(right[order, :-1] - left[order]).max() <= 1e-9 * scale / step**order, order
        assert np.abs(right[order] - exact[order, 1:]).max() <= 1e-9 * scale / step**order, order
    assert h[table.n_first - 1] == step and h[table.n_first] == 10 * step
    assert x[table.n_first] == 3.0 and x[-1] == 15.0


def test_hermite_piece_reproduces_a_quintic():
    """A quintic is its own Hermite interpolant (on a piece of width h)."""
    c = np.array([0.3, -1.2, 0.7, 2.0, -0.4, 0.9])
    h = np.array([0.37])
    x = np.array([0.0, 0.37])
    k = np.arange(6)
    v = (c * x[:, None] ** k).sum(-1)[:, None]
    d = (c[1:] * k[1:] * x[:, None] ** (k[1:] - 1)).sum(-1)[:, None]
    d2 = (c[2:] * k[2:] * (k[2:] - 1) * x[:, None] ** (k[2:] - 2)).sum(-1)[:, None]
    np.testing.assert_allclose(hermite_coefficients(v, d, d2, h)[0, 0], c, rtol=1e-12, atol=1e-12)


def test_outside_the_table_extends_linearly():
    """Below lower and beyond table_max: the end's value plus its slope times the overshoot."""
    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(4.0, 2.0, (3,), (4, 8), 2, True), 3)
    table = build_table(_embedding_net(model.descriptor, 0, 0), -1.0, 2.0, 0.01, 5.0)
    ends = np.array([table.lower, table.table_max])
    (G_end, dG_end) = table_features(table, ends - [0.0, 1e-13])
    G, dG = table_features(table, np.array([-3.0, 14.0]))
    np.testing.assert_allclose(G, G_end + dG_end * np.array([[-2.0], [4.0]]), rtol=1e-10)
    np.testing.assert_allclose(dG, dG_end, rtol=1e-9)
    n, _, delta = locate(table, np.array([-3.0, 0.5, 2.5, 14.0]))
    assert n.tolist() == [0, 150, table.n_first + 5, table.nspline - 1]
    np.testing.assert_allclose(delta, [-2.0, 0.0, 0.0, 4.0])


# ---------------------------------------------------------------------------
# The tabulated model
# ---------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(spec=specs(), seed=st.integers(0, 1000))
def test_compressed_forces_and_virial_are_derivatives_of_its_energy(spec, seed):
    """Along a random displacement d of the atoms, dE = -F . d; along a random strain eps, dE = -W : eps."""
    model, coords, cells, types = make(spec)
    cm = compressed(model, coords, cells, types)
    p, _ = predict(cm, coords, cells, types)
    rng = np.random.default_rng(seed)
    d = rng.normal(size=coords.shape)
    slope = (energy(cm, coords + H * d, cells, types) - energy(cm, coords - H * d, cells, types)) / (2 * H)
    assert abs(slope + np.sum(p.force * d)) <= TOL * max(np.abs(p.force).sum(), FLOOR)
    eps = rng.normal(size=(3, 3))
    slope = (energy(cm, strained(coords, H * eps), strained(cells, H * eps), types)
             - energy(cm, strained(coords, -H * eps), strained(cells, -H * eps), types)) / (2 * H)
    assert abs(slope + np.sum(p.virial[0] * eps.reshape(-1))) <= TOL * max(np.abs(p.virial).sum() * 3, FLOOR)


@settings(max_examples=15, deadline=None)
@given(spec=specs())
def test_fused_kernels_equal_the_readable_path_and_the_exact_model(spec):
    model, coords, cells, types = make(spec)
    cm = compressed(model, coords, cells, types, step=0.001)
    p, D = predict(cm, coords, cells, types, "numba")
    q, Dq = predict(cm, coords, cells, types, "numpy")
    assert rel_err(Dq, D) <= 1e-13
    for mine, theirs in zip(q, p):
        assert rel_err(mine, theirs, FLOOR) <= 1e-12
    exact, De = predict(model, coords, cells, types)
    assert rel_err(D, De) <= 1e-7
    assert rel_err(p.force, exact.force, FLOOR) <= TABLE_TOL


@settings(max_examples=5, deadline=None)
@given(spec=specs(max_atoms=8), batch=st.integers(1, 5))
def test_results_do_not_depend_on_chunking(spec, batch):
    model, coords, cells, types = make(spec)
    cm = compressed(model, coords, cells, types)
    frames = np.concatenate([coords, coords + 0.01])
    cells2 = None if cells is None else np.concatenate([cells, cells])
    whole = DeepPot(cm, batch_size=10_000, workers=1).eval(frames, cells2, types, atomic=True)
    parts = DeepPot(cm, batch_size=batch, workers=2).eval(frames, cells2, types, atomic=True)
    for a, b in zip(parts, whole):
        assert rel_err(a, b, FLOOR) <= 1e-12


def test_a_compressed_model_refuses_training():
    from minidp.se_e2_a import SeAConfig, compute_descriptor

    model = random_model(SeAConfig(4.0, 2.0, (3,), (4, 8), 2, True), 1)
    se = compress_descriptor(model.descriptor, 0.9)
    with pytest.raises(ValueError, match="cannot be trained"):
        compute_descriptor(np.zeros((1, 1, 3, 3)), -np.ones((1, 1, 3), int), np.zeros(1, int), se, keep=True)


def test_bad_compression_settings_are_refused():
    from minidp.se_e2_a import SeAConfig

    se = random_model(SeAConfig(4.0, 2.0, (3,), (4,), 2, True), 1).descriptor
    for kwargs, message in (({"min_nbor_dist": 0.0}, "min_nbor_dist"), ({"min_nbor_dist": 1.0, "step": -1.0}, "step"),
                            ({"min_nbor_dist": 1.0, "extrapolate": 1.0}, "extrapolate")):
        with pytest.raises(ValueError, match=message):
            compress_descriptor(se, **kwargs)
    with pytest.raises(ValueError, match=r"range rule must be one of \('neutral', 'tf'\), got 'pt'"):
        compress_descriptor(se, 1.0, rule="pt")
    with pytest.raises(ValueError, match="lower < upper"):
        Table(np.zeros((3, 4, 6)), 2.0, 1.0, 5.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="ntypes"):
        Compression((), True, np.zeros((1, 3, 4)), (3,))


@pytest.mark.parametrize("step, extrapolate", [(0.03, 5.0), (0.07, 5.0), (0.01, 5.05)])
def test_a_grid_of_partial_pieces_is_refused(step, extrapolate):
    """deepmd-kit's layout has no partial piece: with a step that does not divide the first table (or an
    extrapolate that leaves the second a fraction of a piece) the piece ending at upper is fitted across
    the wrong width, and G is off by ~1e-3 near and beyond upper (deepmd-kit's dpmodel too)."""
    from minidp.se_e2_a import SeAConfig

    net = _embedding_net(random_model(SeAConfig(4.0, 2.0, (3,), (4, 8), 2, True), 3).descriptor, 0, 0)
    with pytest.raises(ValueError, match="not a whole number"):
        build_table(net, -1.0, 9.0, step, extrapolate)


@pytest.mark.parametrize("step", [0.1, 0.05, 0.02, 0.01, 0.005, 0.001])
@pytest.mark.parametrize("lower, upper", [(-1.0, 15.0), (-3.0, 9.0), (-1.0, 7.0), (0.0, 13.0)])
def test_grid_nodes_and_widths_agree_whatever_arange_rounds(step, lower, upper):
    """One node per piece start, the widths h their differences: np.arange rounds its length
    ((15 - -1)/0.1 = 160.00000000000003 nodes), the piece counts do not."""
    x, h = table_grid(lower, upper, step, 10 * step, 5.0)
    n_first, n_second = grid_counts(lower, upper, 5.0 * upper, step, 10 * step)
    assert x.size == h.size + 1 == n_first + n_second + 1
    assert x[n_first] == upper and x[-1] == 5.0 * upper
    np.testing.assert_allclose(np.diff(x), h, rtol=1e-6)  # the nodes carry arange's round-off


def test_table_checks_its_coefficients_and_its_piece_count():
    coef = np.zeros((200 + 40, 4, 6))  # [-1, 1) by 0.01, then [1, 5) by 0.1
    Table(coef, -1.0, 1.0, 5.0, 0.01, 0.1)
    bad = coef.copy()
    bad[17, 2, 4] = np.nan
    with pytest.raises(ValueError, match="a_4 of feature 2 on piece 17 is nan"):
        Table(bad, -1.0, 1.0, 5.0, 0.01, 0.1)
    with pytest.raises(ValueError, match="239 pieces but its bounds make 240"):
        Table(coef[:-1], -1.0, 1.0, 5.0, 0.01, 0.1)
    with pytest.raises(ValueError, match="lower < upper < table_max"):
        Table(coef, -1.0, 0.0, 0.0, 0.01, 0.1)  # the table of min_nbor_dist >= rcut
    with pytest.raises(ValueError, match="finite"):
        Table(coef, -1.0, 1.0, np.inf, 0.01, 0.1)


def test_min_nbor_dist_must_lie_within_rcut():
    """At and beyond rcut every s is 0: the table would collapse to [-1, 0) (1.3e3 eV off on water)."""
    from minidp.se_e2_a import SeAConfig

    se = random_model(SeAConfig(4.0, 2.0, (3,), (4,), 2, True), 1).descriptor
    for rmin in (4.0, 100.0):
        with pytest.raises(ValueError, match=f"min_nbor_dist: {rmin:g} is not below the model's rcut 4"):
            compress_descriptor(se, rmin)
    for rmin, message in ((np.nan, "not finite"), (-1.0, "not positive"), ("0.9", "expected a number")):
        with pytest.raises((ValueError, TypeError), match=message):
            compress_descriptor(se, rmin)


@pytest.mark.parametrize("kwargs, pieces", [({"step": 1e-7}, "376,000,000"), ({"extrapolate": 1e9}, None),
                                            ({"min_nbor_dist": 1e-4}, None)])
def test_table_size_is_known_and_bounded_before_anything_is_built(kwargs, pieces, monkeypatch):
    """-s 1e-7, -e 1e9 or a tiny min_nbor_dist would ask for GiB of tables: refused, saying how large."""
    import minidp.compress as compress
    from minidp.se_e2_a import SeAConfig

    se = random_model(SeAConfig(4.0, 2.0, (3, 2), (4, 8), 2, False), 2).descriptor
    monkeypatch.setattr(compress, "build_table", lambda *a, **k: pytest.fail("a table was built"))
    with pytest.raises(ValueError, match=r"the tables would hold [\d,]+ pieces \([\d,]+ MiB\), above the bound of "
                                         r"512 MiB") as err:
        compress_descriptor(se, **{"min_nbor_dist": 0.9, **kwargs})
    assert pieces is None or pieces in str(err.value)
    plan = compress.plan_tables(se, 0.9, 0.01, 5.0, "neutral")
    assert plan.nbytes == sum(plan.nspline) * 8 * 6 * 8 and len(plan.nspline) == 4


# ---------------------------------------------------------------------------
# Files and the command line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".dp", ".yaml"])
def test_compressed_model_round_trips_with_its_min_nbor_dist(tmp_path, suffix):
    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(4.0, 2.0, (3, 2), (4, 8), 2, False), 2)
    model = dataclasses.replace(model, descriptor=compress_descriptor(model.descriptor, 0.9, 0.05))
    save_model(tmp_path / f"m{suffix}", model)
    data = read_model_dict(tmp_path / f"m{suffix}")
    assert data["model"]["descriptor"]["@version"] == 3 and min_nbor_dist(data) == 0.9
    back = model_from_dict(data).descriptor.compress
    for a, b in zip(back.tables, model.descriptor.compress.tables, strict=True):
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.info, b.info)
    assert back.min_nbor_dist == 0.9


def test_cli_compress_and_info(tmp_path, capsys):
    from minidp.se_e2_a import SeAConfig

    save_model(tmp_path / "m.dp", random_model(SeAConfig(4.0, 2.0, (3,), (4,), 2, True), 2))
    assert main(["compress", "-i", str(tmp_path / "m.dp"), "-o", str(tmp_path / "c.dp")]) == 2
    assert "-t INPUT.json" in capsys.readouterr().err and not (tmp_path / "c.dp").exists()
    assert main(["compress", "-i", str(tmp_path / "m.dp"), "-o", str(tmp_path / "c.dp"), "--min-nbor-dist", "0.8",
                 "-s", "0.02"]) == 0
    assert main(["info", str(tmp_path / "c.dp")]) == 0
    out = capsys.readouterr().out
    assert "compressed   yes" in out and "step 0.02" in out and "0.8 A" in out
    assert main(["compress", "-i", str(tmp_path / "c.dp"), "-o", str(tmp_path / "d.dp")]) == 2
    assert "already compressed" in capsys.readouterr().err


def _plain_and_carrying(tmp_path, rmin=0.9):
    """A model file without a min_nbor_dist and one carrying ``rmin`` (rcut 4)."""
    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(4.0, 2.0, (3, 2), (4, 8), 2, True), 2)
    save_model(tmp_path / "plain.dp", model)
    (tmp_path / "carrying.json").write_bytes(model_bytes(
        {"model": model_to_dict(model), "@variables": {"min_nbor_dist": np.array(rmin)}}, ".json"))
    return tmp_path / "plain.dp", tmp_path / "carrying.json"


def test_cli_min_nbor_dist_given_wins_over_the_models_own_and_says_so(tmp_path, capsys):
    """It was ignored silently: the user's --min-nbor-dist (or -t) is used, in place of the model's."""
    _, carrying = _plain_and_carrying(tmp_path)
    out = tmp_path / "c.dp"
    assert main(["compress", "-i", str(carrying), "-o", str(out), "--min-nbor-dist", "0.5", "-s", "0.05"]) == 0
    assert f"0.5 A (given, in place of the 0.9 A {carrying} carries)" in capsys.readouterr().out
    model = load_model(out)
    assert model.descriptor.compress.min_nbor_dist == 0.5
    expected = compress_descriptor(load_model(carrying).descriptor, 0.5, 0.05).compress
    for a, b in zip(model.descriptor.compress.tables, expected.tables, strict=True):
        assert np.array_equal(a.info, b.info) and np.array_equal(a.coef, b.coef)


@pytest.mark.parametrize("rmin", [4.0, 100.0, 1e300])
def test_cli_min_nbor_dist_beyond_rcut_is_refused_naming_its_origin(rmin, tmp_path, capsys):
    plain, carrying = _plain_and_carrying(tmp_path, rmin)
    for argv, origin in ((["-i", str(plain), "--min-nbor-dist", str(rmin)], "--min-nbor-dist"),
                         (["-i", str(carrying)], f"{carrying}: @variables.min_nbor_dist")):
        assert main(["compress", *argv, "-o", str(tmp_path / "c.dp")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"minidp compress: error: {origin}: {rmin:g} is not below the model's rcut 4: the smallest "
                       "neighbour distance must lie within the cutoff"], err
    assert not (tmp_path / "c.dp").exists()


def test_cli_min_nbor_dist_of_training_systems_beyond_rcut_is_refused(tmp_path, capsys):
    """Training systems with no pair within rcut: neighbor-stat's d_min is its starting 10 A."""
    import json

    import dpdata

    plain, _ = _plain_and_carrying(tmp_path)
    data = {"atom_names": ["T0", "T1"], "atom_numbs": [1, 1], "atom_types": np.array([0, 1]), "orig": np.zeros(3),
            "cells": np.eye(3)[None] * 20.0, "coords": np.array([[[0.0, 0, 0], [8.0, 0, 0]]]),
            "energies": np.zeros(1), "forces": np.zeros((1, 2, 3)), "nopbc": False}
    dpdata.LabeledSystem(data=data).to("deepmd/npy", str(tmp_path / "far"))
    config = {"model": {"type_map": ["T0", "T1"], "descriptor": {"type": "se_e2_a", "sel": [3, 2], "rcut": 4.0,
                                                                  "rcut_smth": 2.0, "neuron": [4, 8], "axis_neuron": 2},
                        "fitting_net": {"neuron": [6, 6]}},
              "learning_rate": {"start_lr": 1e-3}, "loss": {},
              "training": {"training_data": {"systems": ["far"]}, "numb_steps": 1}}
    (tmp_path / "input.json").write_text(json.dumps(config))
    assert main(["compress", "-i", str(plain), "-o", str(tmp_path / "c.dp"), "-t", str(tmp_path / "input.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training systems of" in err[0] and "10 is not below the model's rcut 4" in err[0], err


@pytest.mark.parametrize("option", [["-s", "1e-7"], ["-e", "1e9"], ["--min-nbor-dist", "1e-4"], ["-s", "0.03"],
                                    ["-s", "nan"], ["-s", "-0.01"], ["-e", "1"], ["--min-nbor-dist", "inf"]])
def test_cli_compress_refuses_bad_options_in_one_line(option, tmp_path, capsys):
    """Before: MemoryError tracebacks or GiB allocations (-s 1e-7, -e 1e9, --min-nbor-dist 1e-4)."""
    _, carrying = _plain_and_carrying(tmp_path)
    assert main(["compress", "-i", str(carrying), "-o", str(tmp_path / "c.dp"), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidp compress: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["carrying.json", "plain.dp"]


def test_cli_compress_reads_the_training_systems(tmp_path, capsys):
    """The model file's distance first; without one, -t's training systems (as `dp compress -t`)."""
    need(MODEL_DP)
    assert main(["compress", "-i", str(MODEL_DP), "-o", str(tmp_path / "c.dp"), "-s", "0.1"]) == 0
    assert "0.885439 A (from" in capsys.readouterr().out
    save_model(tmp_path / "plain.dp", load_model(MODEL_DP))  # minidp writes no distance for an exact model
    assert main(["compress", "-i", str(tmp_path / "plain.dp"), "-o", str(tmp_path / "t.dp"), "-s", "0.1",
                 "-t", str(need(MODEL_DP.parent / "input.json"))]) == 0
    assert "0.885439 A (from the training systems" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Against deepmd-kit
# ---------------------------------------------------------------------------


def test_tables_equal_deepmd_enable_compression():
    """The water model's tables are deepmd-kit's (dpmodel enable_compression) coefficient for coefficient,
    a_3..a_5 included (they magnify one ulp of a node's derivative to ~1e-8 of themselves)."""
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.descriptor.se_e2_a import DescrptSeA

    data = read_model_dict(need(MODEL_DP))
    rmin = min_nbor_dist(data)
    ours = compress_descriptor(model_from_dict(data).descriptor, rmin).compress
    theirs = DescrptSeA.deserialize(data["model"]["descriptor"])
    theirs.enable_compression(rmin)
    for table, cd, ci in zip(ours.tables, theirs.compress_data, theirs.compress_info, strict=True):
        assert np.array_equal(table.info, ci)
        np.testing.assert_array_equal(table.data, cd)


def test_deepmd_reads_minidp_compressed_model_and_minidp_reads_deepmds(tmp_path):
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.model.model import BaseModel
    from deepmd.dpmodel.utils.serialization import load_dp_model, save_dp_model

    from minidp.se_e2_a import SeAConfig

    model = random_model(SeAConfig(4.0, 2.0, (3, 2), (4, 8), 2, True), 5)
    model = dataclasses.replace(model, descriptor=compress_descriptor(model.descriptor, 0.9, 0.05))
    save_model(tmp_path / "m.dp", model)
    dm = BaseModel.deserialize(load_dp_model(str(tmp_path / "m.dp"))["model"])
    desc = dm.atomic_model.descriptor
    assert desc.compress
    for a, d in zip(model.descriptor.compress.tables, desc.compress_data, strict=True):
        np.testing.assert_array_equal(a.data, d)
    # and back: deepmd-kit compresses the uncompressed model, minidp reads it
    plain = dataclasses.replace(model, descriptor=dataclasses.replace(model.descriptor, compress=None))
    save_model(tmp_path / "p.dp", plain)
    data = load_dp_model(str(tmp_path / "p.dp"))
    dm = BaseModel.deserialize(data["model"])
    dm.atomic_model.descriptor.enable_compression(0.9, table_stride_1=0.05, table_stride_2=0.5)
    data["model"] = dm.serialize()
    save_dp_model(str(tmp_path / "d.dp"), data)
    back = load_model(tmp_path / "d.dp").descriptor.compress
    for a, b in zip(back.tables, model.descriptor.compress.tables, strict=True):
        assert np.array_equal(a.info, b.info) and np.abs(a.coef[..., 0] - b.coef[..., 0]).max() == 0


@pytest.fixture(scope="session")
def tf_compressed_pb(tmp_path_factory):
    """deepmd-kit's `dp --tf compress` of the water .pb, made once per session."""
    pytest.importorskip("deepmd")
    from validation.compress_check import tf_compressed

    try:
        return tf_compressed(need(MODEL_PB), 0.01, tmp_path_factory.mktemp("compress"))
    except (RuntimeError, FileNotFoundError, subprocess.SubprocessError) as err:
        pytest.skip(f"dp --tf compress is unavailable: {err}")


def _closer_than_rmin(coords, cells, types, rmin):
    """The first frame with its first O's nearest neighbour moved to 0.95 rmin of it: s beyond TF's
    first table ([-1, 9] on the water model)."""
    # (1, natoms, 3), (1, 3, 3)
    xyz, box = coords[:1].astype(float).reshape(1, -1, 3), cells[:1].astype(float).reshape(1, 3, 3)
    nl = build_neighbor_list(xyz, box, types, 6.0, [46, 92])
    o = int(np.flatnonzero(types == 0)[0])
    r = np.where(nl.nlist[0, o] >= 0, np.linalg.norm(nl.rij[0, o], axis=-1), np.inf)
    k = int(np.argmin(r))
    xyz[0, nl.nlist[0, o, k]] = xyz[0, o] + nl.rij[0, o, k] * (0.95 * rmin / r[k])
    return xyz.reshape(1, -1), box.reshape(1, 9)


@pytest.mark.slow
def test_equals_deepmd_tf_compressed(tf_compressed_pb, water_frames):
    """minidp on the .pb's tables agrees with deepmd-kit's TF op to 1e-12. Its own tables on TF's range
    have TF's bounds; they differ from TF's by TF's round-off (see validation.compress_check: a table
    from correctly rounded nodes differs from TF's by as much), forces within 5e-12, also where a pair is
    closer than r_min (the neutral range, a finer table there, differs by 1e-9)."""
    from deepmd.infer import DeepPot as DeepmdPot

    from validation.compress_check import tf_tables

    coords, cells, types = water_frames
    data = read_model_dict(need(MODEL_DP))
    model, rmin = model_from_dict(data), min_nbor_dist(data)
    se = model.descriptor
    tf = tf_tables(tf_compressed_pb, se)
    own = compress_descriptor(se, rmin, rule="tf")
    for a, b in zip(own.compress.tables, tf.tables, strict=True):
        assert np.array_equal(a.info, b.info)
        for k in range(3):  # value, slope, curvature at the nodes: TF's round-off apart
            assert np.abs(a.coef[..., k] - b.coef[..., k]).max() <= 1e-14 * np.abs(b.coef[..., k]).max()
    dp = DeepmdPot(str(tf_compressed_pb))
    for c, b in ((coords[:1].astype(float), cells[:1].astype(float)), _closer_than_rmin(coords, cells, types, rmin)):
        ref = dp.eval(c, b, types, atomic=True)
        for descriptor, tol in ((dataclasses.replace(se, compress=tf), 1e-12), (own, TF_TOL)):
            ours = DeepPot(dataclasses.replace(model, descriptor=descriptor)).eval(c, b, types, atomic=True)
            for name, err in per_atom_error(ours, ref, types.size).items():
                assert err <= tol, name
    neutral = DeepPot(dataclasses.replace(model, descriptor=compress_descriptor(se, rmin)))
    f_neutral = neutral.eval(c, b, types)[1]
    assert np.abs(f_neutral - ref[1]).max() > 1e-10  # the range rule matters there


def test_cli_compress_takes_tf_range_for_a_pb(tmp_path, capsys):
    """A .pb gets `dp --tf compress`'s range unless --range says otherwise; a compressed .pb is refused."""
    pytest.importorskip("deepmd")
    pb = need(MODEL_PB)
    assert main(["compress", "-i", str(pb), "-o", str(tmp_path / "c.dp"), "-s", "0.1"]) == 0
    assert "s in [-1, 9) by 0.1 (tf range)" in capsys.readouterr().out
    assert main(["compress", "-i", str(pb), "-o", str(tmp_path / "n.dp"), "-s", "0.1", "--range", "neutral"]) == 0
    assert "s in [-1, 15) by 0.1 (neutral range)" in capsys.readouterr().out


def test_a_tf_compressed_pb_is_refused_by_name(tf_compressed_pb, capsys):
    assert main(["info", str(tf_compressed_pb)]) == 2
    assert "is a compressed TensorFlow graph (`dp --tf compress`)" in capsys.readouterr().err


def test_ase_calculator_and_eval_command_take_a_compressed_model(tmp_path, water_frames):
    """The compressed water model through the ASE calculator and `minidp eval`: the same numbers as DeepPot."""
    from ase import Atoms

    from minidp.md.calculator import MiniDPCalculator

    need(MODEL_DP)
    assert main(["compress", "-i", str(MODEL_DP), "-o", str(tmp_path / "c.dp"), "-s", "0.05"]) == 0
    coords, cells, types = water_frames
    x, cell = coords[0].reshape(-1, 3).astype(float), cells[0].reshape(3, 3).astype(float)
    dp = DeepPot(tmp_path / "c.dp")
    e, f, _ = dp.eval(x[None], cell[None], types)
    atoms = Atoms(symbols=[dp.get_type_map()[t] for t in types], positions=x, cell=cell, pbc=True)
    atoms.calc = MiniDPCalculator(str(tmp_path / "c.dp"))
    assert abs(atoms.get_potential_energy() - e[0, 0]) <= 1e-9
    np.testing.assert_allclose(atoms.get_forces(), f[0], atol=1e-12)
    exact = DeepPot(MODEL_DP).eval(x[None], cell[None], types)
    assert abs(e[0, 0] - exact[0][0, 0]) < 1e-5  # step 0.05: 1.7e-6 eV here
