"""The cross-check suite (validation/): its case builders, and a 2-frame run of the whole suite
against deepmd-kit, which must agree to 1e-10 and write its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minidp.infer import Frames
from tests.conftest import MODEL_DP, MODEL_PB, WATER, need
from validation import cases
from validation.compare import QUANTITIES, evaluate, max_errors
from validation.crosscheck import build_parser, check_args, main, parse_dp_test

TOL = 1e-10


@pytest.fixture(scope="module")
def frames(water_frames) -> Frames:
    coords, cells, types = water_frames
    return Frames(coords[:2].astype(np.float64).reshape(2, -1, 3), cells[:2].astype(np.float64).reshape(2, 3, 3), types)


# ---------------------------------------------------------------------------
# Case builders (no deepmd-kit needed)
# ---------------------------------------------------------------------------


def test_sheared_keeps_fractional_coordinates(frames):
    geo = cases.sheared(frames, tilt=(0.3, 0.2, 0.1))
    (g,) = geo.groups
    T = cases.shear_matrix((0.3, 0.2, 0.1))
    np.testing.assert_allclose(g.cells, T @ frames.cells)
    s_old = frames.coords @ np.linalg.inv(frames.cells)
    s_new = g.coords @ np.linalg.inv(g.cells)
    np.testing.assert_allclose(s_new, s_old, atol=1e-12)
    assert g.coords.shape == frames.coords.shape
    assert g.cells[0, 1, 0] != 0  # triclinic


def test_small_cells_are_short_have_no_close_pairs_and_fit_sel(frames):
    rcut, sel = 6.0, [46, 92]
    for edge in (7.5, 4.5):
        geo = cases.small_cell(frames, edge=edge, fit=(rcut, sel))
        assert geo.nframes == 2 and len(geo.groups) == 2
        stats = cases.neighbour_stats(geo, rcut, sel)
        assert stats["min_distance"] > 0.8 and not stats["sel_exceeded"]
        for g in geo.groups:
            assert g.coords.shape == (1, g.atom_types.size, 3) and g.cells.shape == (1, 3, 3)
            assert np.abs(np.diag(g.cells[0]) - edge).max() < 0.01 * edge  # the water box is cubic


def test_cluster_is_open_and_within_radius(frames):
    geo = cases.cluster(frames, radius=5.0)
    centre = frames.cells[0].sum(axis=0) / 2
    for g in geo.groups:
        assert g.cells is None
        assert np.linalg.norm(g.coords[0] - centre, axis=1).max() < 5.0
    assert cases.neighbour_stats(geo, 6.0, [46, 92])["min_distance"] > 0.8


def test_lone_atoms_have_no_neighbours():
    geo = cases.lone_atoms(2, 6.0)
    assert geo.natoms == (1, 1) and len(geo.groups) == 3
    stats = cases.neighbour_stats(geo, 6.0, [46, 92])
    assert stats["min_distance"] == np.inf and stats["max_neighbours"] == [0, 0]


def test_drop_close_atoms_removes_overlaps():
    x = np.array([[0.0, 0, 0], [0.5, 0, 0], [3.0, 0, 0], [9.8, 0, 0]])
    cell = 10.0 * np.eye(3)
    # close pairs (0, 1), (0, 3) and (1, 3) (0.2 and 0.7 through the boundary): each atom is in two,
    # so the last, 3, goes first; then the last of (0, 1)
    keep = cases.drop_close_atoms(x, cell, np.zeros(4, dtype=int), 0.8)
    assert keep.tolist() == [0, 2]
    assert cases.close_pairs(x[keep], cell, np.zeros(keep.size, dtype=int), 0.8).size == 0


def test_geometry_and_cases_refuse_bad_input(frames):
    with pytest.raises(ValueError, match="expected one label per group"):
        cases.Geometry("x", "x", (frames,), ())
    with pytest.raises(ValueError, match="needs periodic frames"):
        cases.sheared(frames._replace(cells=None))


def test_evaluate_shapes(frames):
    from minidp import DeepPot

    out = evaluate(DeepPot(need(MODEL_DP)), Frames(frames.coords[:1], frames.cells[:1], frames.atom_types))
    shapes = {"e/atom": (1,), "f": (1, 192, 3), "v/atom": (1, 9), "ae": (1, 192), "av": (1, 192, 9), "D": (1, 192, 1600)}
    assert {q: a.shape for q, a in out.items()} == shapes


def test_max_errors_finds_the_worst_entry(frames):
    groups = (frames, frames)
    ref = [{"ae": np.zeros((2, 192))} for _ in groups]
    ours = [{"ae": np.zeros((2, 192))} for _ in groups]
    ours[1]["ae"][1, 70] = -3e-9
    ref[0]["ae"][0, 0] = ours[0]["ae"][0, 0] = 2.0  # the scale of the relative error
    err = max_errors(ours, ref, groups)["ae"]
    assert err.max_abs == 3e-9 and err.max_rel == 1.5e-9
    assert err.where["group"] == 1 and err.where["frame"] == 1 and err.where["atom"] == 70
    assert err.where["atom_type"] == frames.atom_types[70]


def test_parse_dp_test():
    log = ("DEEPMD INFO    Energy RMSE/Natoms : 8.5e-04 eV\nDEEPMD INFO    Force  RMSE        : 7.7e-02 eV/A\n"
           "DEEPMD INFO    # weighted average\nDEEPMD INFO    Energy RMSE/Natoms : 6.945973e-04 eV\n"
           "DEEPMD INFO    Force  RMSE        : 7.631563e-02 eV/A\n")
    assert parse_dp_test(log) == {"energy_per_atom": 6.945973e-04, "force": 7.631563e-02}


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    args = build_parser().parse_args(["--model", str(tmp_path / "m.dp"), "--data", str(tmp_path)])
    with pytest.raises(ValueError, match=r"expected a \.pb file"):
        check_args(args)
    args = build_parser().parse_args(["--model", str(tmp_path / "m.pb"), "--data", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--model .*m.pb does not exist"):
        check_args(args)
    assert main(["--model", str(tmp_path / "m.pb"), "--nframes", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The whole suite on 2 frames, against deepmd-kit
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(exit code, output folder, report.json) of the suite on 2 frames."""
    pytest.importorskip("deepmd")
    out = tmp_path_factory.mktemp("validation")
    code = main(["--model", str(need(MODEL_PB)), "--data", str(need(WATER / "data_3")), "--out", str(out),
                 "--nframes", "2", "--rmse-frames", "2"])
    return code, out, json.loads((out / "report.json").read_text())


def _comparisons(report, case_prefix):
    return [(c["key"], comp) for c in report["cases"] if c["key"].startswith(case_prefix) for comp in c["comparisons"]]


def test_report_files_are_written(run):
    _, out, report = run
    assert (out / "report.md").read_text().startswith("# minidp against deepmd-kit")
    for png in report["plots"]:
        assert (out / png).stat().st_size > 0
    assert {c["key"] for c in report["cases"]} == {"1-as-given", "2-sheared", "3-small-cell", "3b-shorter-than-rcut",
                                                   "4-cluster", "5-type-one-side-false", "6-lone-atom"}
    # nothing half-written left behind: atomic writes use hidden temporary folders
    assert not [p for p in out.rglob(".*")]


@pytest.mark.parametrize("case", ["1-", "2-", "3-", "3b-", "4-", "6-"])
def test_water_model_agrees_with_deepmd_kit(run, case):
    _, _, report = run
    for key, comp in _comparisons(report, case):
        assert set(comp["errors"]) == set(QUANTITIES)
        worst = {q: e["max_abs"] for q, e in comp["errors"].items()}
        assert max(worst.values()) <= TOL, (key, comp["label"], worst)
        assert comp["passed"]


def test_reference_path_is_in_every_case(run):
    """backend="reference" (the plain path of minidp.se_e2_a) is compared in every case, both models."""
    _, _, report = run
    for c in report["cases"]:
        (comp,) = [comp for comp in c["comparisons"] if comp["label"] == "minidp reference (.dp)"]
        worst = {q: e["max_abs"] for q, e in comp["errors"].items()}
        assert set(worst) == set(QUANTITIES) and max(worst.values()) <= TOL, (c["key"], worst)


def test_type_one_side_false_model_from_dp_agrees(run):
    _, _, report = run
    (comp,) = [c for _, c in _comparisons(report, "5-") if c["label"] == "minidp (.dp)"]
    assert max(e["max_abs"] for e in comp["errors"].values()) <= TOL, comp["errors"]


def test_type_one_side_false_model_from_pb_agrees(run):
    """Needs the out_bias that deepmd-kit 3.2's .pb reader drops (see serialization._restore_pb_out_bias)."""
    _, _, report = run
    (comp,) = [c for _, c in _comparisons(report, "5-") if c["label"] == "minidp (.pb)"]
    assert max(e["max_abs"] for e in comp["errors"].values()) <= TOL, comp["errors"]


def test_rmse_against_labels_matches_deepmd_kit(run):
    _, _, report = run
    rmse = report["labels"]["rmse"]
    ref = rmse["deepmd-kit (DeepPot)"]
    for label in ("minidp (.pb)", "minidp (.dp)"):
        for key, value in ref.items():
            assert abs(rmse[label][key] - value) <= 1e-10 * value
    # dp test prints 7 significant digits
    for key, value in rmse["deepmd-kit (`dp test`)"].items():
        assert abs(value - ref[key]) <= 1e-6 * ref[key]


def test_exit_code_reflects_the_verdict(run):
    code, _, report = run
    assert code == (0 if report["passed"] else 1)
