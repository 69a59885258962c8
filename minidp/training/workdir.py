"""Where a run writes: the output plan (model, checkpoints, learning curve, figure), checked
before any step, and the lock that lets one run at a time use a workdir.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from minidp.checks import InputError
from minidp.io.outputs import check_output
from minidp.training.checkpoint import _checkpoint_path, checkpoint_files
from minidp.training.config import TrainConfig
from minidp.training.lcurve import kept_lcurve, lcurve_columns
from minidp.training.loss import shown_terms

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs cannot lock their workdir
    fcntl = None

class OutputPlan(NamedTuple):
    """Where a run writes, checked before any data is read (:func:`plan_outputs`)."""

    lcurve: Path  # workdir/disp_file
    head: str  # what lcurve.out starts with: the header, or the kept lines of a resumed curve
    replace_lcurve: bool  # the first write replaces an existing lcurve.out
    inputs: tuple[Path, ...]  # the training and validation systems: no output may touch them


def _checkpoint_steps(stem: Path) -> set[int]:
    """The steps k of the files <stem>-<k>.dp and <stem>-<k>.npz in stem's folder, complete or not."""
    steps = (p.name[len(stem.name) + 1:].removesuffix(".dp").removesuffix(".npz")
             for p in stem.parent.glob(f"{stem.name}-*"))
    return {int(k) for k in steps if k.isdigit()}


def _complete_checkpoints(stem: Path) -> list[int]:
    """The steps k of the complete checkpoints <stem>-<k> (both .dp and .npz) in stem's folder, in order."""
    steps = []
    for npz in stem.parent.glob(f"{stem.name}-*.npz"):
        k = npz.name[len(stem.name) + 1:-len(".npz")]
        if k.isdigit() and checkpoint_files(npz.with_suffix(""))[0].exists():
            steps.append(int(k))
    return sorted(steps)


def _later_checkpoints(stem: Path, step: int) -> list[str]:
    """Complete checkpoints <stem>-<k> in stem's folder with k > step (a run that went further)."""
    return [f"{stem.name}-{k}" for k in _complete_checkpoints(stem) if k > step]


def prune_checkpoints(stem: Path, keep: int) -> None:
    """deepmd-kit's max_ckpt_keep: delete all but the newest ``keep`` complete checkpoints <stem>-<k>
    (0 keeps all). Only checkpoints are touched: plan_outputs checked them minidp's before the run."""
    if keep <= 0:
        return
    for k in _complete_checkpoints(stem)[:-keep]:
        for f in checkpoint_files(stem.parent / f"{stem.name}-{k}"):
            f.unlink(missing_ok=True)


# The lock file a run holds in its workdir (hidden; removed when the run ends)
WORKDIR_LOCK = ".minidp-train.lock"


def _new_folders(folder: Path) -> list[Path]:
    """Make folder and its missing parents; the ones made, innermost first."""
    missing = [q for q in (folder, *folder.parents) if not q.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _lock_fd(path: Path) -> int:
    """An open descriptor of path holding its flock; InputError naming the holder's pid if another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"{path.parent} is in use by another minidp train run (pid {holder}); wait for it "
                             "to end, or give another --workdir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # locked a file that a run ending just now removed: lock the new one


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold workdir's training lock for the block; a second run there is refused in one line naming
    the first one's pid, before it writes anything.

    The lock is an flock on WORKDIR_LOCK (which holds the pid): the kernel releases it when the
    process ends, however it ends (a killed run leaves at most the unlocked file, which the next
    run takes over). The file is removed when the block ends, and so are the folders made for
    workdir if the run left them empty (a run refused on its data writes nothing).
    """
    made = _new_folders(workdir)
    path = workdir / WORKDIR_LOCK
    if fcntl is None:  # not POSIX: nothing to lock with
        warnings.warn(f"cannot lock {workdir} on this system: two runs there at once are not refused")
        fd = None
    else:
        fd = _lock_fd(path)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # removed while held: no other run can be holding it
            os.close(fd)
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def plan_outputs(config: TrainConfig, output, workdir: Path, restart, start: int, overwrite: bool) -> OutputPlan:
    """Refuse, before any data is read, a run that would write over anything but its own outputs.

    A fresh run refuses an existing lcurve.out, lcurve.png, checkpoint or model unless ``overwrite``
    (and then only minidp's own files of that kind). A restart continues its curve (dropping the
    lines after its checkpoint: a killed run's tail) but refuses to go back behind a later complete
    checkpoint (a finished or longer run: its lines, checkpoints and model would be lost) unless
    ``overwrite``; restarting into a new ``workdir`` keeps everything. It also refuses a numb_steps
    below the checkpoint's step.
    """
    n = config.numb_steps
    if start > n:
        raise ValueError(f"checkpoint {restart} is at step {start}, beyond numb_steps {n}: nothing to train "
                         f"(give --numb-steps of at least {start}, or restart from an earlier checkpoint)")
    inputs = tuple(config.training.systems) + (tuple(config.validation.systems) if config.validation else ())
    stem = workdir / config.save_ckpt
    later = _later_checkpoints(stem, start) if restart is not None else []
    if later and not overwrite:
        raise ValueError(f"{workdir} holds checkpoints after step {start} ({', '.join(later)}): restarting there "
                         "would replace them, their lines of the learning curve and the model; restart "
                         "into a new --workdir, or give --overwrite")
    keep = restart is not None
    if output is not None:
        check_output(output, "model", inputs + checkpoint_files(_checkpoint_path(restart)) if keep else inputs,
                     overwrite)
    # the checkpoints the run will write that exist already (and the last, for its folder): not one
    # check per step of a million-step run
    due = {n} | {t for t in _checkpoint_steps(stem) if start < t <= n and t % config.save_freq == 0}
    for t in sorted(due):
        dp_file, npz_file = checkpoint_files(stem.parent / f"{stem.name}-{t}")
        check_output(dp_file, "model", inputs, overwrite or not npz_file.exists())
        check_output(npz_file, "checkpoint", inputs, overwrite)
    check_output(workdir / "lcurve.png", "png", inputs, overwrite or keep)
    lcurve = workdir / config.disp_file
    virial = config.loss.start_pref_v > 0 or config.loss.limit_pref_v > 0
    if keep and lcurve.exists():
        check_output(lcurve, "lcurve", inputs, True)
        kept = kept_lcurve(lcurve, start)
        own = _checkpoint_path(restart).parent.resolve() == workdir.resolve()
        if not own and not overwrite and kept != lcurve.read_text():
            # dropping lines is resuming only for the run the checkpoint belongs to
            raise ValueError(f"{lcurve} holds lines after step {start} of a run the checkpoint {restart} is not "
                             "from; restart into a new --workdir, or give --overwrite")
        return OutputPlan(lcurve, kept, True, inputs)
    check_output(lcurve, "lcurve", inputs, overwrite)
    head = "# " + " ".join(lcurve_columns(config.validation is not None, virial, shown_terms(config.loss))) + "\n"
    return OutputPlan(lcurve, head, overwrite, inputs)
