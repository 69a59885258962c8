"""Property test of the commands that read systems (eval, test, eval-desc, model-devi) on malformed systems.

A small labelled system is written as deepmd/npy, deepmd/npy/mixed (two kinds of frame), an HDF5 file of
two systems, or extended XYZ; hypothesis damages one of its files or datasets (a NaN or inf, a row fewer,
truncated, emptied, deleted, overwritten with bytes). Every command then either exits 2 with one line
naming the problem, or succeeds with a correct result: eval's energies are those of DeepPot on the
frames dpdata reads from the same files, every other output is finite. No traceback, no input changed,
nothing left beside the output. Kept small (MINIDP_FUZZ_EXAMPLES raises it).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidp import DeepPot
from minidp.cli import main
from minidp.io.systems import model_types
from tests.test_cli import small_model, small_system  # noqa: F401  (fixtures)

dpdata = pytest.importorskip("dpdata")
h5py = pytest.importorskip("h5py")

EXAMPLES = int(os.environ.get("MINIDP_FUZZ_EXAMPLES", 40))
FORMATS = {"npy": "sys", "mixed": "mixed", "h5": "multi.h5", "xyz": "w.xyz"}
DAMAGES = ("none", "nan", "row", "truncate", "empty", "delete", "bytes")
COMMANDS = ("eval", "test", "eval-desc", "model-devi")


@pytest.fixture(scope="module")
def inputs(small_system, tmp_path_factory):  # noqa: F811
    """The clean inputs, one folder per format, copied for each example."""
    root = tmp_path_factory.mktemp("fuzz")
    water = dpdata.LabeledSystem(str(small_system), fmt="deepmd/npy")
    other = water.copy()  # another kind of frame of as many atoms: an O made an H
    other.data["atom_types"] = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1])
    other.data["atom_numbs"] = [2, 7]
    part = water.pick_atom_idx([0, 1, 3, 4, 6, 7])  # two molecules
    for name in FORMATS:
        (root / name).mkdir()
    water.to("deepmd/npy", str(root / "npy" / "sys"), set_size=2)
    dpdata.MultiSystems(water, other).to("deepmd/npy/mixed", str(root / "mixed" / "mixed"))
    dpdata.MultiSystems(water, part).to("deepmd/hdf5", str(root / "h5" / "multi.h5"))
    water.to("extxyz", str(root / "xyz" / "w.xyz"))
    return root


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _damage_array(values: np.ndarray, damage: str, where: int, bad: float) -> np.ndarray | None:
    """The array after the damage (None: delete it)."""
    if damage == "row":
        return values[:-1] if values.ndim and values.shape[0] else values[..., :-1]
    if damage == "nan" and values.size:
        values = values.copy()
        values.flat[where % values.size] = bad if values.dtype.kind == "f" else 99
    return None if damage == "delete" else values


def _damage_h5(path: Path, damage: str, where: int, bad: float) -> None:
    with h5py.File(path, "a") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        name = names[where % len(names)]
        values = _damage_array(f[name][()], damage, where, bad)
        del f[name]
        if values is not None:
            f[name] = values


def _damage(folder: Path, damage: str, where: int, bad: float) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    path = files[where % len(files)]
    if path.suffix == ".h5" and damage in ("nan", "row", "delete"):
        _damage_h5(path, damage, where, bad)
    elif path.suffix == ".npy" and damage in ("nan", "row"):
        np.save(path, _damage_array(np.load(path), damage, where, bad))
    elif damage in ("nan", "row"):  # a text file: a number made nan, or a line dropped
        lines = path.read_text().splitlines(keepends=True)
        k = where % len(lines)
        lines[k] = re.sub(r"-?\d+\.\d+(e[-+]\d+)?", "nan", lines[k], count=1) if damage == "nan" else ""
        path.write_text("".join(lines))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:where % max(path.stat().st_size, 1)])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "delete":
        path.unlink()
    elif damage == "bytes":
        path.write_bytes(bytes((where * 7 + k) % 256 for k in range(64)))


def _dpdata_energies(dp, system: Path, fmt: str) -> np.ndarray | None:
    """DeepPot's energies on the frames dpdata reads from the (damaged) input, sorted; None if dpdata cannot."""
    try:
        if fmt == "npy":
            systems = [dpdata.System(str(system), fmt="deepmd/npy")]
        else:
            kind = {"mixed": "deepmd/npy/mixed", "h5": "deepmd/hdf5", "xyz": "extxyz"}[fmt]
            systems = list(dpdata.MultiSystems().from_fmt_obj(dpdata.format.Format.get_formats()[kind](),
                                                              str(system), labeled=fmt == "xyz"))
    except Exception:
        return None
    energies = []
    for s in systems:
        types = model_types(s["atom_names"], s["atom_types"], dp.get_type_map())
        energies.append(dp.eval(s["coords"], None if s.nopbc else s["cells"], types)[0][:, 0])
    return np.sort(np.concatenate(energies))


def _finite_output(command: str, out: Path, stdout: str) -> None:
    """A successful run's results are finite numbers."""
    if command == "test":
        numbers = [float(x) for x in re.findall(r"(?:RMSE|MAE) (\S+)", stdout)]
        assert numbers and np.isfinite(numbers).all(), stdout
    elif command == "eval-desc":
        assert all(np.isfinite(np.load(p)).all() for p in out.glob("*.npy"))
    elif command == "model-devi":
        rows = [line.split() for line in out.read_text().splitlines() if not line.startswith("#")]
        assert rows and np.isfinite(np.array(rows, dtype=float)).all()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMATS)), command=st.sampled_from(COMMANDS), damage=st.sampled_from(DAMAGES),
       where=st.integers(0, 10**6), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_commands_on_malformed_systems(inputs, small_model, fmt, command, damage, where, bad):  # noqa: F811
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(inputs / fmt, tmp / "in")
        if damage != "none":
            _damage(tmp / "in", damage, where, bad)
        system = tmp / "in" / FORMATS[fmt]
        before = _tree(tmp / "in")
        (tmp / "res").mkdir()
        out = tmp / "res" / ("md.out" if command == "model-devi" else "out")
        models = [str(small_model)] * (2 if command == "model-devi" else 1)
        argv = [command, "-m", *models, "-s", str(system)] + ([] if command == "test" else ["-o", str(out)])
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)  # an unexpected exception (a traceback) fails the test here
        err = stderr.getvalue().strip().splitlines()
        assert _tree(tmp / "in") == before, "an input was changed"
        if rc != 0:
            assert rc == 2 and len(err) == 1 and err[0].startswith(f"minidp {command}: error: "), err
            assert list((tmp / "res").iterdir()) == [], "a failed run left something beside its output"
            assert damage != "none", err
            return
        assert [p.name for p in (tmp / "res").iterdir()] == ([out.name] if command != "test" else [])
        _finite_output(command, out, stdout.getvalue())
        if command == "eval":
            energies = np.sort(np.concatenate([np.load(p).ravel() for p in sorted(out.rglob("energy.npy"))]))
            reference = _dpdata_energies(DeepPot(small_model, progress=False), system, fmt)
            assert damage != "none" or reference is not None
            if reference is not None:
                np.testing.assert_allclose(energies, reference, rtol=1e-10, atol=1e-10)
