"""Training never loses a run: restarts that disagree are refused, checkpoints are whole, kills are harmless.

Each test is a probe of issue 16 that misbehaved before the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minidp.cli import main
from minidp.io.serialization import load_model
from minidp.training.config import parse_input
from minidp.training.lcurve import read_lcurve
from minidp.training.loop import train
from tests.test_train import _input, data_dir  # noqa: F401  (fixture)


def _write_input(tmp_path, data_dir, numb_steps=6, **training):
    d = _input(numb_steps, **training)
    d["training"]["training_data"]["systems"] = [str(data_dir / "sys_a"), str(data_dir / "sys_b")]
    d["training"]["validation_data"]["systems"] = [str(data_dir / "sys_b")]
    path = tmp_path / "input.json"
    path.write_text(json.dumps(d))
    return path, d


def test_restart_with_fewer_steps_keeps_the_finished_run(data_dir, tmp_path, capsys):
    """--restart ckpt-3 --numb-steps 2 on a finished 6-step run: refused, lcurve and model untouched."""
    path, _ = _write_input(tmp_path, data_dir)
    w = tmp_path / "w"
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in w.iterdir() if p.is_file()}
    capsys.readouterr()
    for extra in (["--numb-steps", "2"], []):
        assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q",
                     "--restart", str(w / "model.ckpt-3"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert ("beyond numb_steps 2" if extra else "holds checkpoints after step 3 (model.ckpt-6)") in err[0]
    assert {p.name: p.read_bytes() for p in w.iterdir() if p.is_file()} == before
    # branching off into a new workdir keeps the old run and trains
    assert main(["train", str(path), "-o", str(tmp_path / "m2.dp"), "--workdir", str(tmp_path / "w2"), "-q",
                 "--restart", str(w / "model.ckpt-3")]) == 0
    assert {p.name: p.read_bytes() for p in w.iterdir() if p.is_file()} == before


def test_a_fresh_run_never_writes_over_an_earlier_one(data_dir, tmp_path, capsys):
    path, _ = _write_input(tmp_path, data_dir, 3)
    argv = ["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "w"), "-q"]
    assert main(argv) == 0
    before = (tmp_path / "w" / "lcurve.out").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "w" / "lcurve.out").read_text() == before
    assert main(argv + ["--overwrite"]) == 0


def test_a_failed_run_leaves_no_header_only_lcurve(data_dir, tmp_path):
    d = _input(3)
    d["training"]["training_data"]["systems"] = ["no_such_system"]
    with pytest.raises(FileNotFoundError):
        train(parse_input(d, data_dir), None, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_workdir_that_is_a_file_is_one_line(data_dir, tmp_path, capsys):
    path, _ = _write_input(tmp_path, data_dir, 3)
    (tmp_path / "wfile").write_text("x")
    assert main(["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "wfile"), "-q"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_outputs_inside_the_training_data_are_refused(data_dir, tmp_path):
    config = parse_input(_input(3), data_dir)
    with pytest.raises(ValueError, match="overlaps the input"):
        train(config, data_dir / "sys_a" / "m.dp", tmp_path, progress=False)
    with pytest.raises(ValueError, match="overlaps the input"):
        train(config, None, data_dir / "sys_b", progress=False)
    assert not (data_dir / "sys_b" / "lcurve.out").exists()


@pytest.fixture()
def finished(data_dir, tmp_path):
    config = parse_input(_input(3), data_dir)
    train(config, None, tmp_path / "a", progress=False)
    return tmp_path / "a" / "model.ckpt-3"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["fitting_net"].update(neuron=[8, 6]), "model/fitting_net/neuron [8, 6] (checkpoint: [8, 8])"),
    (lambda d: d["model"]["fitting_net"].update(resnet_dt=False), "model/fitting_net/resnet_dt False"),
    (lambda d: d["training"]["training_data"].update(systems=["sys_b", "sys_a"]), "the training data"),
])
def test_restart_that_disagrees_with_the_checkpoint_is_refused(edit, message, finished, data_dir, tmp_path):
    d = _input(6)
    edit(d)
    with pytest.raises(ValueError, match="does not match the input") as err:
        train(parse_input(d, data_dir), None, tmp_path / "b", restart=finished, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "empty, truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "empty, truncated or corrupt"),
    (lambda p: np.savez(p.open("wb"), step=np.array(3)), "lacks ['adam_t']"),
    (lambda p: _drop_key(p, "m_0_W"), "m_0_W is missing"),
])
def test_damaged_checkpoints_are_one_line(damage, message, finished, data_dir, tmp_path, capsys):
    damage(finished.parent / "model.ckpt-3.npz")
    path, _ = _write_input(tmp_path, data_dir)
    assert main(["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "b"), "-q",
                 "--restart", str(finished)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "b").exists()


def _drop_key(path, key):
    with np.load(path) as z:
        state = {k: z[k] for k in z.files if not k.startswith(key)}
    with open(path, "wb") as fh:
        np.savez(fh, **state)


def _complete_checkpoints(w):
    return sorted(int(p.name.split("-")[1][:-4]) for p in w.glob("model.ckpt-*.npz")
                  if (w / p.name.replace(".npz", ".dp")).exists())


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_equals_an_uninterrupted_run(data_dir, tmp_path):
    """minidp train killed (SIGKILL) three times at random moments: whole checkpoints, whole lcurve lines,
    and --restart from the last checkpoint gives the uninterrupted run's weights bit for bit."""
    path, _ = _write_input(tmp_path, data_dir, 60, disp_freq=1, save_freq=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "minidp", "train", str(path), "-q"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["-o", str(ref / "m.dp"), "--workdir", str(ref)], env=env, check=True, capture_output=True)
    rng = np.random.default_rng(16)
    killed_at = []
    for trial in range(3):
        w = tmp_path / f"kill{trial}"
        proc = subprocess.Popen(cmd + ["-o", str(w / "m.dp"), "--workdir", str(w)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a random step of the run, then a random moment within it (while it writes a line or a checkpoint)
        target, lcurve = rng.integers(3 + 18 * trial, 21 + 18 * trial), w / "lcurve.out"
        while proc.poll() is None and (not lcurve.exists() or len(lcurve.read_text().splitlines()) < target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _complete_checkpoints(w)
        if not done:
            continue
        lines = (w / "lcurve.out").read_text().splitlines()
        assert lines[0].startswith("# step") and all(len(ln.split()) == len(lines[0].split()) - 1 for ln in lines[1:])
        steps = read_lcurve(w / "lcurve.out")["step"]
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        last = done[-1]
        killed_at.append(last)
        if (w / "m.dp").exists():  # killed while plotting: the model is whole and final
            assert last == 60
        else:
            r = subprocess.run(cmd + ["-o", str(w / "m.dp"), "--workdir", str(w), "--restart", str(w / f"model.ckpt-{last}")],
                               env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
        assert (w / "lcurve.out").read_text() == (ref / "lcurve.out").read_text()
        for p, q in zip(load_model(ref / "m.dp").params(), load_model(w / "m.dp").params()):
            for k in p:
                np.testing.assert_array_equal(p[k], q[k])
    print("SIGKILL after checkpoints", killed_at)
    assert killed_at, "every kill came before the first checkpoint"


# ---------------------------------------------------------------------------
# The input: every value checked by type and range, before any data is read
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["descriptor"].update(resnet_dt="false"),
     "input: model/descriptor/resnet_dt: expected true or false, got str 'false'"),
    (lambda d: d["training"].update(seed="abc"), "input: training/seed: expected an integer, got str 'abc'"),
    (lambda d: d["model"]["descriptor"].update(rcut="six"), "input: model/descriptor/rcut: expected a number, got str 'six'"),
    (lambda d: d["model"]["descriptor"].update(rcut="6"), "input: model/descriptor/rcut: expected a number, got str '6'"),
    (lambda d: d["model"]["descriptor"].update(sel="auto:abc"),
     "input: model/descriptor/sel: the factor of sel 'auto:abc' is not a number"),
    (lambda d: d["training"]["training_data"].update(batch_size="auto:abc"),
     "input: training/training_data/batch_size: 'auto:abc'; expected a positive integer"),
    (lambda d: d["model"]["fitting_net"].update(resnet_dt=1), "input: model/fitting_net/resnet_dt: expected true or false"),
    (lambda d: d["learning_rate"].update(start_lr=-1e-3), "input: learning_rate (exp): start_lr: -0.001 is not positive"),
    (lambda d: d["loss"].update(start_pref_f=float("nan")), "input: loss start_pref_f: nan is not finite"),
    (lambda d: d["model"]["descriptor"].update(neuron=[4, 8.5]), "input: model/descriptor/neuron[1]: expected an integer"),
    (lambda d: d["model"].update(type_map=["O", "O"]), "input: model/type_map: 'O' appears 2 times"),
    (lambda d: d["training"].update(numb_steps=True), "input: training/numb_steps must be a positive integer, got True"),
    (lambda d: d["training"]["training_data"].update(auto_prob_style=5),
     "input: training/training_data/auto_prob_style: expected a non-empty string, got int 5"),
])
def test_training_input_values_are_checked_by_key(edit, message, data_dir, tmp_path, capsys):
    path, d = _write_input(tmp_path, data_dir)
    edit(d)
    d["training"]["training_data"]["systems"] = ["no_such_system"]  # checked before any data is read
    path.write_text(json.dumps(d))
    assert main(["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "w").exists()


def test_a_restart_never_trims_the_curve_of_another_run(finished, data_dir, tmp_path):
    """Resuming drops the curve's lines after the checkpoint only in the checkpoint's own workdir."""
    other = tmp_path / "other"
    train(parse_input(_input(6), data_dir), None, other, progress=False)
    for p in other.glob("model.ckpt-*"):
        p.unlink()  # a run whose checkpoints were cleaned up, its curve kept
    before = (other / "lcurve.out").read_text()
    with pytest.raises(ValueError, match="holds lines after step 3 of a run the checkpoint"):
        train(parse_input(_input(6), data_dir), None, other, restart=finished, progress=False)
    assert (other / "lcurve.out").read_text() == before


def test_ctrl_c_during_training_is_one_line_and_resumable(data_dir, tmp_path, capsys, monkeypatch):
    import minidp.training.loop

    real, calls = minidp.training.loop.loss_and_grad, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(minidp.training.loop, "loss_and_grad", interrupted)
    path, _ = _write_input(tmp_path, data_dir)
    w = tmp_path / "w"
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"]) == 130
    assert capsys.readouterr().err.strip() == "minidp train: interrupted"
    # interrupted in step 4: no model, no temporary files; the step-3 checkpoint and whole lines
    assert sorted(p.name for p in w.iterdir()) == ["lcurve.out", "model.ckpt-3.dp", "model.ckpt-3.npz"]
    assert list(read_lcurve(w / "lcurve.out")["step"]) == [0, 2]
    monkeypatch.setattr(minidp.training.loop, "loss_and_grad", real)
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q",
                 "--restart", str(w / "model.ckpt-3")]) == 0
    assert list(read_lcurve(w / "lcurve.out")["step"]) == [0, 2, 4, 6]


# ---------------------------------------------------------------------------
# Issue 20: labels checked when read, a diverging run stopped, one run per workdir
# ---------------------------------------------------------------------------


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _damage(root, system, set_name, stem, index, value):
    """Write ``value`` at flat index ``index`` of <system>/<set>/<stem>.npy (its dtype kept)."""
    path = root / system / set_name / f"{stem}.npy"
    a = np.load(path)
    a.reshape(-1)[index] = value
    np.save(path, a)


@pytest.mark.parametrize("stem, index, value, frame, entry", [
    ("energy", 1, np.nan, 1, ""),  # set.001 holds frames 3..5 of sys_a: its frame 1
    ("force", 36 + 7, np.inf, 1, " (entry 7 of the frame)"),  # 12 atoms x 3 per frame
    ("virial", 9 * 2 + 4, -np.inf, 2, " (entry 4 of the frame)"),
    ("coord", 5, np.nan, 0, " (entry 5 of the frame)"),
    ("box", 9 + 8, np.nan, 1, " (entry 8 of the frame)"),
])
def test_non_finite_labels_and_coordinates_are_named_by_file_and_frame(stem, index, value, frame, entry, data_dir,
                                                                         tmp_path, capsys):
    """A NaN energy or an inf force trained every weight to NaN, exited 0 and wrote a model `info` refused."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    _damage(data, "sys_a", "set.001", stem, index, value)
    path, _ = _write_input(tmp_path, data)
    before = _snapshot(data)
    w = tmp_path / "w"
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    shown = {np.nan: "nan", np.inf: "inf", -np.inf: "-inf"}[value]
    name = {"energy": "energy", "force": "force", "virial": "virial", "coord": "coordinate", "box": "cell"}[stem]
    # the reader (evaluation's too) names the file, its frame and the system's: set.001 holds frames 3..5
    assert err == [f"minidp train: error: {data / 'sys_a' / 'set.001' / stem}.npy: frame {frame} (frame {3 + frame} "
                   f"of the system) holds {shown}; expected finite numbers"]
    assert not w.exists() and _snapshot(data) == before


def test_a_training_system_in_another_format_is_refused_naming_no_missing_option(data_dir, tmp_path, capsys):
    """train has no -f option: the message said 'give -f FORMAT?'."""
    (tmp_path / "frames.xyz").write_text("1\n\nO 0 0 0\n")
    (tmp_path / "folder").mkdir()
    for system in ("frames.xyz", "folder"):
        path, d = _write_input(tmp_path, data_dir)
        d["training"]["training_data"]["systems"] = [str(tmp_path / system)]
        path.write_text(json.dumps(d))
        assert main(["train", str(path), "-o", str(tmp_path / "m.dp"), "--workdir", str(tmp_path / "w"), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "-f" not in err[0], err
        assert f"training system {tmp_path / system} is not a deepmd/npy folder (with type.raw)" in err[0]
    assert not (tmp_path / "w").exists()


def test_a_diverging_run_stops_in_one_line_and_writes_no_model(data_dir, tmp_path, capsys):
    """start_lr 1e100: the weights overflow at step 1. It trained to NaN, exited 0 and wrote a model
    minidp refuses to load. A label too large for float64 stops the run at its first step."""
    path, d = _write_input(tmp_path, data_dir, 6, disp_freq=1, save_freq=1)
    d["learning_rate"].update(start_lr=1e100, stop_lr=1e100)
    path.write_text(json.dumps(d))
    w = tmp_path / "w"
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidp train: error: training stopped at step 1: the loss or its "
                                               "gradient is not finite (loss trn "), err
    assert err[0].endswith("; the run diverged: a smaller start_lr may help); no model written, no checkpoint written")
    assert sorted(p.name for p in w.iterdir()) == ["lcurve.out"]  # the line of step 0; no model, no checkpoint
    assert list(read_lcurve(w / "lcurve.out")["step"]) == [0]
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    _damage(tmp_path / "data", "sys_b", "set.000", "energy", 2, 1e300)
    path, _ = _write_input(tmp_path, tmp_path / "data")
    assert main(["train", str(path), "-o", str(tmp_path / "w2" / "m.dp"), "--workdir", str(tmp_path / "w2"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(loss trn inf, val inf; labels too large for float64?)" in err[0], err


def test_a_run_that_turns_non_finite_keeps_its_last_good_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    import minidp.training.loop

    real, calls = minidp.training.loop.loss_and_grad, []

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        value, grads, pred = real(*args, **kwargs)
        if len(calls) == 6:
            grads[0][next(iter(grads[0]))][...] = np.nan
        return value, grads, pred

    monkeypatch.setattr(minidp.training.loop, "loss_and_grad", nan_at_step_5)
    path, _ = _write_input(tmp_path, data_dir)
    w = tmp_path / "w"
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training stopped at step 5" in err[0] and f"checkpoint is {w / 'model.ckpt-3'}" in err[0]
    assert sorted(p.name for p in w.iterdir()) == ["lcurve.out", "model.ckpt-3.dp", "model.ckpt-3.npz"]
    assert list(read_lcurve(w / "lcurve.out")["step"]) == [0, 2, 4]
    monkeypatch.setattr(minidp.training.loop, "loss_and_grad", real)
    assert main(["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q",
                 "--restart", str(w / "model.ckpt-3")]) == 0
    assert np.isfinite(load_model(w / "m.dp").bias).all()


def test_a_second_run_in_a_workdir_in_use_is_refused_before_it_writes(data_dir, tmp_path, capsys):
    """Two runs in one workdir: the second --restart appended its lines to the first one's lcurve.out.
    Now it is refused in one line naming the first run's pid; the lock dies with its holder."""
    from minidp.training.workdir import WORKDIR_LOCK

    path, _ = _write_input(tmp_path, data_dir, 10**6, disp_freq=1, save_freq=2)
    w = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "minidp", "train", str(path), "-q", "-o", str(w / "m.dp"),
                              "--workdir", str(w)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while first.poll() is None and len(_complete_checkpoints(w)) < 2:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # holding its lock, mid-run
        step = _complete_checkpoints(w)[-1]
        before = _snapshot(w)
        argv = ["train", str(path), "-o", str(w / "m.dp"), "--workdir", str(w), "-q",
                "--restart", str(w / f"model.ckpt-{step}"), "--numb-steps", str(step + 2)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [(f"minidp train: error: {w} is in use by another minidp train run (pid {first.pid}); wait "
                        "for it to end, or give another --workdir")]
        assert _snapshot(w) == before
    finally:
        first.kill()
        first.wait()
    assert (w / WORKDIR_LOCK).exists()  # left by the killed run, unlocked
    assert main(argv) == 0
    assert not (w / WORKDIR_LOCK).exists()
    steps = read_lcurve(w / "lcurve.out")["step"]
    np.testing.assert_array_equal(steps, np.arange(step + 3))


def test_a_singular_cell_in_the_training_data_names_the_system_and_its_frame(data_dir, tmp_path, capsys):
    """The neighbour list numbers frames within the batch it was given: the error is renumbered in the system."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    for k in range(9):
        _damage(data, "sys_a", "set.001", "box", 9 + k, 0.0)  # frame 1 of set.001: frame 4 of sys_a
    path, _ = _write_input(tmp_path, data)
    assert main(["train", str(path), "-o", str(tmp_path / "w" / "m.dp"), "--workdir", str(tmp_path / "w"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: system {data / 'sys_a'}: cell of frame 4 is singular" in err[0], err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, message", [
    (["{tmp}", "-o", "m.dp"], "input file {tmp} is a folder; expected a JSON file (deepmd-kit's input.json)"),
    (["{input}", "-o", "m.dp", "--numb-steps", "0"], "--numb-steps must be a positive integer, got 0"),
    (["{input}", "-o", "m.dp", "--workdir", ""], "workdir must be a folder, got an empty path"),
])
def test_command_line_values_are_named_by_their_option(argv, message, data_dir, tmp_path, capsys):
    """A folder given as the input said it 'does not exist'; --numb-steps 0 was named numb_steps;
    --workdir '' trained into the current folder."""
    path, _ = _write_input(tmp_path, data_dir)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{input}", str(path)) for a in argv]
    before = _snapshot(tmp_path)
    assert main(["train", *argv, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minidp train: error: {message.replace('{tmp}', str(tmp_path))}"]
    assert _snapshot(tmp_path) == before
