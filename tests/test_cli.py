"""The command line: every subcommand end to end, and one-line errors with no partial output."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.cli import build_parser, main
from minidp.model import new_model
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import save_model
from tests.conftest import MODEL_DP, WATER, need


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random small O/H model saved as .dp (no deepmd-kit or ../shared needed)."""
    model = new_model(["O", "H"], SeAConfig(4.0, 0.5, (20, 40), (4, 8), 2, True), (8, 8), seed=3)
    path = tmp_path_factory.mktemp("model") / "small.dp"
    save_model(path, model)
    return path


@pytest.fixture(scope="module")
def small_system(tmp_path_factory):
    """A labelled deepmd/npy system of 3 frames of 3 water molecules written by dpdata."""
    import dpdata

    rng = np.random.default_rng(0)
    mol = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    frames = []
    for _ in range(3):
        centres = np.array([[1.0, 1.0, 1.0], [4.0, 1.5, 1.0], [2.5, 4.0, 3.0]]) + rng.normal(0, 0.1, (3, 3))
        frames.append(np.concatenate([centres + mol[0], centres + mol[1], centres + mol[2]]))
    coords = np.array(frames)
    data = {
        "atom_names": ["O", "H"], "atom_numbs": [3, 6], "atom_types": np.array([0, 0, 0, 1, 1, 1, 1, 1, 1]),
        "orig": np.zeros(3), "cells": np.tile(np.eye(3) * 7.0, (3, 1, 1)), "coords": coords,
        "energies": rng.normal(size=3), "forces": rng.normal(size=(3, 9, 3)),
        "virials": rng.normal(size=(3, 3, 3)), "nopbc": False,
    }
    path = tmp_path_factory.mktemp("system") / "water3"
    dpdata.LabeledSystem(data=data).to("deepmd/npy", str(path))
    return path


def test_info(small_model, capsys):
    assert main(["info", str(small_model)]) == 0
    out = capsys.readouterr().out
    assert "type_map     ['O', 'H']" in out and "sel [20, 40]" in out


def test_eval_writes_a_labelled_system_that_matches_deeppot(small_model, small_system, tmp_path):
    import dpdata

    from minidp import DeepPot

    out = tmp_path / "labelled"
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(out)]) == 0
    labelled = dpdata.LabeledSystem(str(out), fmt="deepmd/npy")
    source = dpdata.System(str(small_system), fmt="deepmd/npy")
    e, f, v = DeepPot(small_model).eval(source["coords"], source["cells"], source["atom_types"])
    np.testing.assert_allclose(labelled["energies"], e[:, 0], rtol=1e-12)
    np.testing.assert_allclose(labelled["forces"], f, atol=1e-12)
    np.testing.assert_allclose(labelled["virials"].reshape(-1, 9), v, atol=1e-12)


def test_eval_backend_reference(small_model, small_system, tmp_path, capsys):
    """--backend reference runs the plain path and writes the labels the default backend writes."""
    import dpdata

    outs = {}
    for backend in ("reference", "numba"):
        outs[backend] = tmp_path / backend
        assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(outs[backend]),
                     "--backend", backend]) == 0
    a, b = (dpdata.LabeledSystem(str(outs[k]), fmt="deepmd/npy") for k in ("reference", "numba"))
    np.testing.assert_allclose(a["forces"], b["forces"], rtol=1e-12, atol=1e-13)
    capsys.readouterr()
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(tmp_path / "x"),
                 "--backend", "gpu"]) == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_eval_desc_and_test(small_model, small_system, tmp_path, capsys):
    assert main(["eval-desc", "-m", str(small_model), "-s", str(small_system), "-o", str(tmp_path)]) == 0
    assert np.load(tmp_path / "water3.npy").shape == (3, 9, 16)
    assert main(["test", "-m", str(small_model), "-s", str(small_system), "--plots", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "energy/atom" in out and "force" in out and "virial" in out
    assert (tmp_path / "p" / "parity-force.png").stat().st_size > 1000


def test_dp_test_figures_on_the_water_model(capsys):
    """minidp test reproduces dp test on data_3 (force RMSE 0.076 eV/A, energy 6.9e-4 eV/atom)."""
    assert main(["test", "-m", str(need(MODEL_DP)), "-s", str(need(WATER / "data_3")), "-n", "10"]) == 0
    out = capsys.readouterr().out
    force_rmse = float(out.split("force")[1].split("RMSE")[1].split()[0])
    assert 0.05 < force_rmse < 0.1


@pytest.mark.parametrize("argv, message", [
    (["eval", "-m", "missing.dp", "-s", "nosuch", "-o", "x"], "model file missing.dp does not exist"),
    (["info", "model.txt"], "unknown model file type '.txt'"),
    (["eval", "-m", "{model}", "-s", "no/such/system", "-o", "x"], "system no/such/system does not exist"),
])
def test_errors_are_one_line_with_a_nonzero_exit(argv, message, small_model, tmp_path, capsys):
    argv = [a.replace("{model}", str(small_model)) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_corrupt_and_empty_model_files(tmp_path, capsys):
    empty = tmp_path / "empty.dp"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.dp"
    corrupt.write_bytes(b"not an hdf5 file at all")
    assert main(["info", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["info", str(corrupt)]) == 2
    assert "cannot read model file" in capsys.readouterr().err


def test_element_outside_the_type_map_leaves_no_output(small_model, small_system, tmp_path, capsys):
    import dpdata

    system = dpdata.LabeledSystem(str(small_system), fmt="deepmd/npy")
    system.data["atom_names"] = ["O", "C"]
    bad = tmp_path / "carbon"
    system.to("deepmd/npy", str(bad))
    out = tmp_path / "never"
    assert main(["eval", "-m", str(small_model), "-s", str(bad), "-o", str(out)]) == 2
    assert "element(s) ['C'] are not in the model's type map ['O', 'H']" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_every_subcommand_has_help():
    for cmd in (["eval"], ["eval-desc"], ["test"], ["info"], ["tutorial", "cos"], ["tutorial", "optimize"]):
        r = subprocess.run([sys.executable, "-m", "minidp", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: minidp" in r.stdout


@pytest.mark.parametrize("fmt, name, extra", [
    ("vasp/poscar", "POSCAR", []),
    ("deepmd/hdf5", "w.hdf5", []),
    ("lammps/lmp", "w.lmp", ["-f", "lammps/lmp", "-t", "O", "H"]),
])
def test_eval_reads_other_formats(small_model, small_system, tmp_path, fmt, name, extra):
    """Any format dpdata reads; numbered types are named with --type-map."""
    import dpdata

    from minidp import DeepPot

    system = dpdata.System(str(small_system), fmt="deepmd/npy")[:1]
    system.to(fmt, str(tmp_path / name))
    out = tmp_path / "labelled"
    assert main(["eval", "-m", str(small_model), "-s", str(tmp_path / name), *extra, "-o", str(out)]) == 0
    e, _, _ = DeepPot(small_model).eval(system["coords"], system["cells"], system["atom_types"])
    assert np.load(out / "set.000" / "energy.npy").ravel() == pytest.approx(e[:, 0], rel=1e-10)


# ---------------------------------------------------------------------------
# Usage errors: one line and exit 2, for every subcommand (issue 20)
# ---------------------------------------------------------------------------


def _subcommands(parser, prefix=()) -> dict:
    """{argv prefix: its parser} for every subcommand, nested ones (tutorial cos) included."""
    import argparse

    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_subcommands(sub, prefix + (name,)))
    return found


SUBCOMMANDS = {k: v for k, v in _subcommands(build_parser()).items() if k}


def _bad_arguments(parser) -> list[list[str]]:
    """Arguments argparse refuses: an unknown option, each typed option given text, each choice a bogus one."""
    bad = [["--no-such-option"], ["--no-such-option", "x", "-Z"]]
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        opt = action.option_strings[-1]
        if action.type in (int, float):
            bad += [[opt, "abc"], [opt, "1e"], [opt, ""]]
        if action.choices:
            bad.append([opt, "bogus"])
    return bad


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_every_usage_error_is_one_line_with_exit_2(data):
    prefix = data.draw(st.sampled_from(sorted(SUBCOMMANDS)))
    argv = [*prefix, *data.draw(st.sampled_from(_bad_arguments(SUBCOMMANDS[prefix])))]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    lines = err.getvalue().splitlines()
    assert status == 2, argv
    assert len(lines) == 1 and lines[0].startswith(f"minidp {' '.join(prefix)}: error: "), (argv, lines)
    assert "usage" not in err.getvalue() and out.getvalue() == "", argv


@pytest.mark.parametrize("argv, message", [
    ([], "minidp: error: the following arguments are required: command"),
    (["bogus"], "minidp: error: argument command: invalid choice: 'bogus'"),
    (["compress", "-i", "a.dp", "-o", "b.dp", "-t", "in.json", "--min-nbor-dist", "1"],
     "minidp compress: error: argument --min-nbor-dist: not allowed with argument -t/--training-script"),
    (["compress", "-i", "a.dp", "-o", "b.dp", "--range", "bogus"], "argument --range: invalid choice: 'bogus'"),
    (["change-bias", "m.dp", "-o", "b.dp", "-b", "abc"], "argument -b/--bias-value: invalid float value: 'abc'"),
    (["ipi", "--port", "abc"], "minidp ipi: error: argument --port: invalid int value: 'abc'"),
    (["train"], "minidp train: error: the following arguments are required: input, -o/--output"),
])
def test_usage_errors_name_the_argument_on_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and message in captured.err, captured.err
