"""Outputs never destroy anything: minidp.io.outputs.safe_output and every command that writes through it.

Each test is one probe of issue 16 that lost or overwrote data before the fix.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from minidp.cli import main
from minidp.io.outputs import MARKER, check_output, safe_output
from tests.test_cli import small_model, small_system  # noqa: F401  (fixtures)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _user_folder(tmp_path, small_system):
    """A user's project: the input system, an fparam.npy beside its labels, and notes."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(small_system, proj / "sys")
    np.save(proj / "sys" / "set.000" / "fparam.npy", np.ones(3))
    (proj / "notes.txt").write_text("a day's work\n")
    return proj


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_output_onto_the_current_folder_deletes_nothing(small_model, small_system, tmp_path, capsys, monkeypatch):
    proj = _user_folder(tmp_path, small_system)
    before = _tree(proj)
    monkeypatch.chdir(proj)
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", "."]) == 2
    _one_line(capsys, "current folder")
    assert _tree(proj) == before


def test_output_containing_the_input_system_is_refused(small_model, small_system, tmp_path, capsys):
    proj = _user_folder(tmp_path, small_system)
    before = _tree(proj)
    assert main(["eval", "-m", str(small_model), "-s", str(proj / "sys"), "-o", str(proj)]) == 2
    _one_line(capsys, "overlaps the input")
    assert main(["eval", "-m", str(small_model), "-s", str(proj / "sys"), "-o", str(proj), "--overwrite"]) == 2
    assert _tree(proj) == before


def test_output_onto_the_input_system_keeps_its_labels(small_model, small_system, tmp_path, capsys):
    proj = _user_folder(tmp_path, small_system)
    energy = np.load(proj / "sys" / "set.000" / "energy.npy")
    for extra in ([], ["--overwrite"]):
        assert main(["eval", "-m", str(small_model), "-s", str(proj / "sys"), "-o", str(proj / "sys"), *extra]) == 2
        _one_line(capsys, "overlaps the input")
    assert main(["eval", "-m", str(small_model), "-s", str(proj / "sys"), "-o", str(proj / "sys" / "out")]) == 2
    np.testing.assert_array_equal(np.load(proj / "sys" / "set.000" / "energy.npy"), energy)
    assert (proj / "sys" / "set.000" / "fparam.npy").exists()


def test_overwrite_replaces_only_a_previous_minidp_output(small_model, small_system, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(out)]
    assert main(argv) == 0
    assert (out / MARKER).read_text().strip() == "deepmd/npy"
    assert main(argv) == 2
    _one_line(capsys, "exists and is not empty", "--overwrite")
    assert main(argv + ["--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--overwrite"]) == 2
    _one_line(capsys, "holds more than a previous minidp deepmd/npy output")
    assert (out / "notes.txt").read_text() == "mine"
    # a deepmd/npy folder minidp did not write (no marker) is never replaced
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(small_system.parent / "x"),
                 ]) == 0
    (small_system.parent / "x" / MARKER).unlink()
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(small_system.parent / "x"),
                 "--overwrite"]) == 2


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text("x"), "is an existing file"),
    (lambda p: p.parent.joinpath("f").write_text("x") or None, "is a file, not a folder"),
])
def test_file_system_problems_are_one_line(make, words, small_model, small_system, tmp_path, capsys):
    target = tmp_path / "target"
    make(target)
    out = target if words == "is an existing file" else tmp_path / "f" / "sub"
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(out)]) == 2
    _one_line(capsys, words)


def test_plots_onto_a_file_and_a_read_only_folder(small_model, small_system, tmp_path, capsys):
    (tmp_path / "plots.png").write_text("not a folder")
    assert main(["test", "-m", str(small_model), "-s", str(small_system), "--plots", str(tmp_path / "plots.png")]) == 2
    _one_line(capsys, "is an existing file")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(ro / "out")]) == 2
        _one_line(capsys, "permission denied")
    finally:
        ro.chmod(0o700)


def test_read_only_check_in_check_output(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(ValueError, match="permission denied"):
        check_output(tmp_path / "new", "deepmd/npy")


@pytest.mark.parametrize("size", ["0", "-1"])
def test_set_size_must_be_positive(size, small_model, small_system, tmp_path, capsys):
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(tmp_path / "o"),
                 "--set-size", size]) == 2
    _one_line(capsys, f"--set-size must be a positive integer, got {size}")
    assert not (tmp_path / "o").exists()


def test_numb_test_negative_is_refused(small_model, small_system, capsys):
    assert main(["test", "-m", str(small_model), "-s", str(small_system), "-n", "-5"]) == 2
    _one_line(capsys, "--numb-test must be", "got -5")


def test_eval_desc_same_names_collide_never(small_model, small_system, tmp_path, capsys):
    import shutil

    for d in ("a", "b"):
        shutil.copytree(small_system, tmp_path / d / "sys")
    argv = ["eval-desc", "-m", str(small_model), "-s", str(tmp_path / "a" / "sys"), str(tmp_path / "b" / "sys"),
            "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    _one_line(capsys, "would both write sys.npy")
    assert not (tmp_path / "out").exists()


def test_eval_desc_writes_nothing_when_a_later_system_fails(small_model, small_system, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "type.raw").write_text("0 0\n")
    assert main(["eval-desc", "-m", str(small_model), "-s", str(small_system), str(bad),
                 "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_stream_writer_refuses_existing_and_overlapping_outputs(small_model, small_system, tmp_path):
    import shutil

    from minidp.infer import DeepPot
    from minidp.active.stream import write_labelled_stream

    dp = DeepPot(small_model, progress=False)
    sys_copy = tmp_path / "sys"
    shutil.copytree(small_system, sys_copy)
    before = _tree(tmp_path)
    for out in (sys_copy, tmp_path, sys_copy / "set.000"):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="overlaps the input"):
                write_labelled_stream(dp, sys_copy, out, 2, overwrite=overwrite)
    assert _tree(tmp_path) == before


def test_interrupt_leaves_nothing_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "out"
    with safe_output(target, "descriptors") as tmp:
        tmp.mkdir()
        np.save(tmp / "a.npy", np.zeros(2))
    with pytest.raises(KeyboardInterrupt):
        with safe_output(target, "descriptors", overwrite=True) as tmp:
            tmp.mkdir()
            raise KeyboardInterrupt
    assert _tree(tmp_path) == ["out", f"out/{MARKER}", "out/a.npy"]


def test_ctrl_c_in_a_command_is_one_line_exit_130(small_model, small_system, tmp_path, capsys, monkeypatch):
    import minidp.infer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minidp.infer.DeepPot, "iter_eval", interrupted)
    assert main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(tmp_path / "o")]) == 130
    assert _one_line(capsys) == "minidp eval: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_real_bug_keeps_its_traceback(small_model, small_system, tmp_path, monkeypatch):
    import minidp.infer

    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(minidp.infer.DeepPot, "iter_eval", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(["eval", "-m", str(small_model), "-s", str(small_system), "-o", str(tmp_path / "o")])


def test_lammps_out_file_replaces_only_a_deviation_file(tmp_path):
    """pair_style minidp's out_file starts afresh, as deepmd-kit's plugin, but never over a user's file."""
    from minidp.md.lammps import plugin_devi_header, start_devi_file

    notes = tmp_path / "notes.txt"
    notes.write_text("a day's work\n")
    with pytest.raises(ValueError, match="holds more than a previous minidp model_devi output"):
        start_devi_file(notes)
    assert notes.read_text() == "a day's work\n"
    devi = tmp_path / "model_devi.out"
    devi.write_text(plugin_devi_header() + "           0" + " 1.0" * 6 + "\n")
    start_devi_file(devi)
    assert devi.read_text() == plugin_devi_header()
