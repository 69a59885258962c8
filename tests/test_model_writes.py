"""Writing models onto a full disk: compress and change-bias fail cleanly, as eval and train do.

HDF5 buffers a file's metadata and writes it when the file closes; on a full disk that close
failed inside h5py (a RuntimeError traceback), and HDF5's broken state then crashed the
interpreter (rc 139), sometimes before the hidden temporary folder was removed. minidp now makes
the file in memory and writes it in one call: a full disk is one OSError naming the file, exit 2,
nothing left behind. Simulated two ways: the write raising ENOSPC after half the bytes, and a real
process whose files may not grow beyond a few kB (RLIMIT_FSIZE: the kernel's EFBIG, like ENOSPC).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidp.cli import main
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import save_model
from tests.conftest import ROOT, random_model

CFG = SeAConfig(4.0, 2.0, (3, 2), (4, 8), 2, False)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in" / "m.dp"
    path.parent.mkdir()
    model = random_model(CFG, 2)
    model.type_map = ["O", "H"]
    save_model(path, model, min_nbor_dist=0.9)
    return path


def _full_disk(monkeypatch):
    """Every Path.write_bytes writes half its bytes, then fails as a full disk does."""

    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("suffix", [".dp", ".yaml", ".json"])
def test_save_model_on_a_full_disk_names_the_file_and_leaves_nothing(suffix, tmp_path, monkeypatch):
    model = random_model(CFG, 2)
    (tmp_path / "out").mkdir()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match=rf"\[Errno 28\] cannot write the model \S*m{suffix}: No space left on device"):
        save_model(tmp_path / "out" / f"m{suffix}", model)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("command", [["compress", "-i", "{model}", "-o", "{out}", "-s", "0.05"],
                                     ["change-bias", "{model}", "-b", "1", "2", "-o", "{out}"]])
def test_commands_on_a_full_disk_exit_2_with_one_line(command, model_file, tmp_path, monkeypatch, capsys):
    before = model_file.read_bytes()
    (tmp_path / "out").mkdir()
    _full_disk(monkeypatch)
    argv = [a.format(model=model_file, out=tmp_path / "out" / "new.dp") for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minidp {command[0]}: error: [Errno 28] cannot write the model {tmp_path / 'out' / 'new.dp'}: "
                   "No space left on device"]
    assert list((tmp_path / "out").iterdir()) == [] and model_file.read_bytes() == before


def _limited(limit: int):
    """preexec_fn: files of this process may not grow beyond ``limit`` bytes; a write past it fails
    with EFBIG instead of killing the process (SIGXFSZ ignored)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", [["compress", "-i", "{model}", "-o", "{out}", "-s", "0.05"],
                                     ["change-bias", "{model}", "-b", "1", "2", "-o", "{out}"]])
@pytest.mark.parametrize("limit", [4096, 12000])
def test_a_real_write_failure_in_a_subprocess(command, limit, model_file, tmp_path):
    """Before: h5py's close failed (RuntimeError traceback) or the process crashed (rc -11)."""
    pytest.importorskip("resource")
    before = model_file.read_bytes()
    (tmp_path / "out").mkdir()
    argv = [a.format(model=model_file, out=tmp_path / "out" / "new.dp") for a in command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "minidp", *argv], capture_output=True, text=True, env=env,
                       preexec_fn=_limited(limit), timeout=300)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("implib-gen")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "cannot write the model" in lines[0] and "File too large" in lines[0], lines
    assert list((tmp_path / "out").iterdir()) == [] and model_file.read_bytes() == before


def test_the_model_made_in_memory_reads_back_the_same(model_file, tmp_path):
    """The in-memory HDF5 file is an ordinary .dp: read back, every array is the same."""
    from minidp.io.serialization import read_model_dict

    out = tmp_path / "again.dp"
    assert main(["change-bias", str(model_file), "-b", "1", "2", "-o", str(out)]) == 0
    a, b = read_model_dict(model_file), read_model_dict(out)
    wa = a["model"]["descriptor"]["embeddings"]["networks"][3]["layers"][1]["@variables"]["w"]
    wb = b["model"]["descriptor"]["embeddings"]["networks"][3]["layers"][1]["@variables"]["w"]
    assert np.array_equal(wa, wb) and b["@variables"]["min_nbor_dist"] == 0.9


@pytest.mark.parametrize("command", [["compress", "-i", "{model}", "-o", "{out}", "-s", "0.05"],
                                     ["change-bias", "{model}", "-b", "1", "2", "-o", "{out}"]])
def test_an_output_of_a_kind_minidp_cannot_write_is_refused_before_any_work(command, model_file, tmp_path,
                                                                            monkeypatch, capsys):
    """-o x.pb was refused only after the tables were built (or the bias fitted)."""
    import minidp.compress
    import minidp.infer

    monkeypatch.setattr(minidp.compress, "compress_descriptor", lambda *a, **k: pytest.fail("tables built"))
    monkeypatch.setattr(minidp.infer.DeepPot, "__init__", lambda *a, **k: pytest.fail("model read"))
    out = tmp_path / "new.pb"
    assert main([a.format(model=model_file, out=out) for a in command]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"minidp {command[0]}: error: cannot write '.pb' models ({out}); expected one of "
        "('.dp', '.yaml', '.yml', '.json')"]
