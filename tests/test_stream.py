"""Streaming inference (minidp.active.stream): block by block equals DeepPot.eval, across set.* boundaries,
from deepmd/npy and deepmd/hdf5; labelled output written atomically; the same on a two-worker Dask cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

from minidp import DeepPot
from minidp.io.serialization import save_model
from minidp.active.stream import chunk_bag, dask_eval, stream_eval, worker_deeppot, write_labelled_stream
from minidp.io.systems import lazy_system, read_frames, set_ranges
from tests.test_serialization import _random_model

NATOMS = 12
SETS = (5, 3, 4)  # frames per set.*: blocks of most sizes cross a boundary


def _write_system(folder, nframes=SETS, nopbc=False, seed=0):
    """A random deepmd/npy system of 12 atoms with its type map reversed from the model's (H, O).

    Sets hold energy and force labels, only the first a virial, so the system's
    common labels are energy and force. Coordinates of the middle set are float32.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "type_map.raw").write_text("H\nO\n")
    np.savetxt(folder / "type.raw", [1, 0, 0] * 4, fmt="%d")
    if nopbc:
        (folder / "nopbc").touch()
    for i, n in enumerate(nframes):
        s = folder / f"set.{i:03d}"
        s.mkdir()
        coord = rng.uniform(0, 6, size=(n, NATOMS * 3))
        np.save(s / "coord.npy", coord.astype(np.float32) if i == 1 else coord)
        if not nopbc:
            np.save(s / "box.npy", np.tile(np.eye(3).ravel() * 6.0, (n, 1)))
        np.save(s / "energy.npy", rng.normal(size=n))
        np.save(s / "force.npy", rng.normal(size=(n, NATOMS * 3)))
        if i == 0:
            np.save(s / "virial.npy", rng.normal(size=(n, 9)))
    return folder


def _whole(folder):
    """The system read at once with np.load, and its types in the model's numbering (O=0, H=1)."""
    sets = sorted(folder.glob("set.*"))
    coords = np.concatenate([np.load(s / "coord.npy") for s in sets]).astype(np.float64).reshape(-1, NATOMS, 3)
    cells = None if (folder / "nopbc").exists() else np.concatenate([np.load(s / "box.npy") for s in sets])
    types = 1 - np.loadtxt(folder / "type.raw", dtype=int)
    return coords, cells, types


@pytest.fixture(scope="module")
def dp():
    return DeepPot(_random_model(seed=5), progress=False)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    return _write_system(tmp_path_factory.mktemp("stream") / "sys")


@pytest.fixture(scope="module")
def reference(dp, system):
    coords, cells, types = _whole(system)
    return dp.eval(coords, cells, types, atomic=True)


def _assert_equals_eval(prediction, reference):
    e, f, v, ae, av = reference
    for ours, ref in zip(prediction, (e[:, 0], f, v, ae[..., 0], av)):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def _joined(pairs):
    from minidp.model import Prediction

    return Prediction(*(np.concatenate(x) for x in zip(*(p for _, p in pairs))))


def test_set_ranges_cut_a_range_at_set_boundaries():
    assert set_ranges(SETS, 3, 10) == [(0, 3, 5, 0), (1, 0, 3, 2), (2, 0, 2, 5)]
    assert set_ranges(SETS, 5, 8) == [(1, 0, 3, 0)]
    assert set_ranges(SETS, 0, 12) == [(0, 0, 5, 0), (1, 0, 3, 5), (2, 0, 4, 8)]


def test_lazy_system_reads_metadata_and_read_frames_copies_a_range(system):
    s = lazy_system(system)
    assert (s.atom_names, s.counts, s.labels, s.nframes, s.natoms, s.nopbc) == (
        ["H", "O"], SETS, ("energy", "force"), 12, NATOMS, False)
    block = read_frames(s, 3, 10)
    coords, cells, _ = _whole(system)
    assert block.frames == slice(3, 10)
    assert block.coords.shape == (7, NATOMS, 3) and block.coords.dtype == np.float64
    assert block.cells.shape == (7, 3, 3)
    assert block.labels["energy"].shape == (7,) and block.labels["force"].shape == (7, NATOMS, 3)
    np.testing.assert_array_equal(block.coords, coords[3:10])
    np.testing.assert_array_equal(block.cells, cells[3:10].reshape(7, 3, 3))
    force = np.concatenate([np.load(p / "force.npy") for p in sorted(system.glob("set.*"))])
    np.testing.assert_array_equal(block.labels["force"], force[3:10].reshape(7, NATOMS, 3))


@pytest.mark.parametrize("frames_per_chunk", [1, 2, 4, 5, 7, 12, 50])
def test_stream_equals_eval(dp, system, reference, frames_per_chunk):
    pairs = list(stream_eval(dp, system, frames_per_chunk))
    starts = [b.frames.start for b, _ in pairs]
    assert starts == list(range(0, 12, frames_per_chunk))
    for block, p in pairs:
        nf = block.frames.stop - block.frames.start
        assert block.coords.shape == (nf, NATOMS, 3) and p.energy.shape == (nf,)
        assert p.force.shape == (nf, NATOMS, 3) and p.virial.shape == (nf, 9)
        assert p.atom_energy.shape == (nf, NATOMS) and p.atom_virial.shape == (nf, NATOMS, 9)
    _assert_equals_eval(_joined(pairs), reference)


def test_hdf5_streams_like_npy(dp, system, reference, tmp_path):
    dpdata = pytest.importorskip("dpdata")
    # dpdata reads labels only when every set has them: drop the one virial
    shutil.copytree(system, tmp_path / "copy")
    (tmp_path / "copy" / "set.000" / "virial.npy").unlink()
    labelled = dpdata.LabeledSystem(str(tmp_path / "copy"), fmt="deepmd/npy")
    labelled.to("deepmd/hdf5", str(tmp_path / "d.h5"), set_size=5)
    s = lazy_system(tmp_path / "d.h5")
    assert (s.group, s.counts, s.atom_names) == ("", (5, 5, 2), ["H", "O"])
    _assert_equals_eval(_joined(stream_eval(dp, tmp_path / "d.h5", 3)), reference)
    # a system inside a group, dpdata's file#group spelling
    ms = dpdata.MultiSystems(labelled)
    ms.to("deepmd/hdf5", str(tmp_path / "m.h5"))
    group = next(iter(ms.systems))
    _assert_equals_eval(_joined(stream_eval(dp, f"{tmp_path / 'm.h5'}#{group}", 4)), reference)


def test_open_boundaries(dp, tmp_path):
    folder = _write_system(tmp_path / "open", nopbc=True)
    coords, cells, types = _whole(folder)
    assert cells is None and lazy_system(folder).nopbc
    _assert_equals_eval(_joined(stream_eval(dp, folder, 4)), dp.eval(coords, None, types, atomic=True))
    out = write_labelled_stream(dp, folder, tmp_path / "out", 4)
    assert (out / "nopbc").exists() and not (out / "set.000" / "box.npy").exists()


@pytest.mark.parametrize("frames_per_chunk, set_size", [(4, 5), (3, 50), (1, 2)])
def test_written_system_reads_back_with_dpdata(dp, system, reference, tmp_path, frames_per_chunk, set_size):
    dpdata = pytest.importorskip("dpdata")
    out = write_labelled_stream(dp, system, tmp_path / "labelled", frames_per_chunk, set_size=set_size)
    assert out == tmp_path / "labelled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled"]  # no temporaries left
    assert len(list(out.glob("set.*"))) == -(-12 // set_size)
    back = dpdata.LabeledSystem(str(out), fmt="deepmd/npy")
    coords, cells, _ = _whole(system)
    e, f, v, _, _ = reference
    assert back["atom_names"] == ["H", "O"]
    np.testing.assert_array_equal(back["atom_types"], np.loadtxt(system / "type.raw", dtype=int))
    np.testing.assert_array_equal(back["coords"], coords)
    np.testing.assert_array_equal(back["cells"], cells.reshape(-1, 3, 3))
    # labels to round-off: how frames are grouped changes the order of BLAS sums
    for key, ref in (("energies", e[:, 0]), ("forces", f), ("virials", v.reshape(-1, 3, 3))):
        np.testing.assert_allclose(back[key], ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


class _FailingDeepPot:
    """A DeepPot that raises on its third block."""

    def __init__(self, dp):
        self.dp, self.calls = dp, 0

    def __getattr__(self, name):  # the getters (type map, dims of fparam/aparam) are the DeepPot's
        return getattr(self.dp, name)

    def iter_eval(self, *args):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("injected failure")
        return self.dp.iter_eval(*args)


def test_failed_run_leaves_no_output(dp, system, tmp_path):
    with pytest.raises(RuntimeError, match="injected failure"):
        write_labelled_stream(_FailingDeepPot(dp), system, tmp_path / "labelled", 2)
    assert list(tmp_path.iterdir()) == []
    # an earlier output stays as it was
    write_labelled_stream(dp, system, tmp_path / "labelled", 5)
    before = np.load(tmp_path / "labelled" / "set.000" / "energy.npy")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_labelled_stream(dp, system, tmp_path / "labelled", 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_labelled_stream(_FailingDeepPot(dp), system, tmp_path / "labelled", 2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled"]
    np.testing.assert_array_equal(np.load(tmp_path / "labelled" / "set.000" / "energy.npy"), before)


def test_memory_is_bounded_by_the_block(tmp_path):
    """Peak traced memory while labelling 400 frames is that of 40 frames: only a block is held."""
    dp = DeepPot(_random_model(seed=5), progress=False, workers=1)  # one thread: the same chunks in flight
    peaks = {}
    for n in (40, 400):
        folder = _write_system(tmp_path / f"s{n}", nframes=(n // 2, n // 2), seed=n)
        write_labelled_stream(dp, folder, tmp_path / f"warm{n}", 10)  # first calls allocate caches
        tracemalloc.start()
        write_labelled_stream(dp, folder, tmp_path / f"out{n}", 10)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # holding the 400 frames' results would take 400 * 12 * 13 * 8 = 500 kB, their coordinates 115 kB;
    # one block of 10 frames takes 12 kB
    assert peaks[400] < peaks[40] + 100_000, peaks


@pytest.mark.parametrize("edit, error, match", [
    (lambda f: np.save(f / "set.001" / "coord.npy", np.zeros((3, 35))), ValueError,
     r"set.001/coord.npy has shape \(3, 35\); expected \(3, 36\) for 3 frames of 12 atoms"),
    (lambda f: np.save(f / "set.002" / "box.npy", np.zeros((3, 9))), ValueError,
     r"set.002/box.npy has shape \(3, 9\); expected \(4, 9\)"),
    (lambda f: (f / "set.000" / "box.npy").unlink(), ValueError, r"set.000 has no box.npy"),
    (lambda f: (f / "set.000" / "coord.npy").unlink(), ValueError, r"set.000 has no coord.npy"),
    (lambda f: (f / "type_map.raw").write_text("C\nO\n"), ValueError,
     r"element\(s\) \['C'\] are not in the model's type map \['O', 'H'\]"),
    (lambda f: (f / "type_map.raw").write_text("H\n"), ValueError, r"has type 1 but type_map.raw names 1 types"),
])
def test_bad_systems_are_named(dp, tmp_path, edit, error, match):
    folder = _write_system(tmp_path / "bad")
    edit(folder)
    with pytest.raises(error, match=match):
        next(stream_eval(dp, folder, 4))


def test_bad_arguments_are_named(dp, system, tmp_path):
    with pytest.raises(ValueError, match="frames_per_chunk must be a positive integer, got 0"):
        next(stream_eval(dp, system, 0))
    with pytest.raises(ValueError, match="set_size must be a positive integer, got 2.5"):
        write_labelled_stream(dp, system, tmp_path / "o", 2, set_size=2.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lazy_system(tmp_path / "nowhere")
    (tmp_path / "x.xyz").write_text("")
    with pytest.raises(ValueError, match="expected a deepmd/npy folder"):
        lazy_system(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match=r"frames 10..12 are not within the 12 frames"):
        read_frames(lazy_system(system), 10, 13)
    assert not (tmp_path / "o").exists()


def test_missing_dask_names_the_extra(system, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.bag", None)
    with pytest.raises(ImportError, match=r"pip install 'minidp\[tools\]'"):
        chunk_bag("m.dp", [system], 4)


def test_two_dask_workers_equal_eval(dp, system, reference, tmp_path):
    """A LocalCluster of two worker processes; each loads the model once; results equal eval."""
    distributed = pytest.importorskip("dask.distributed")
    model_path = tmp_path / "m.dp"
    save_model(model_path, dp.model)
    other = _write_system(tmp_path / "other", nframes=(6,), seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dashboard's port may be taken by another cluster
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        results = dask_eval(model_path, [system, other], 2, client=client)
        loads = client.run(lambda: worker_deeppot.cache_info().misses)
    assert len(results) == 2
    _assert_equals_eval(results[0], reference)
    coords, cells, types = _whole(other)
    _assert_equals_eval(results[1], dp.eval(coords, cells, types, atomic=True))
    assert sorted(loads.values())[-1] == 1 and sum(loads.values()) >= 1, loads


def test_dask_example_runs(tmp_path):
    """examples/dask_eval.py on the shipped water frames: two workers, the same results as eval."""
    pytest.importorskip("dask.distributed")
    from tests.conftest import ROOT

    example = ROOT / "minidp" / "examples" / "water"
    model, frames = example / "model.dp", example / "frames"
    if not (model.exists() and frames.exists()):
        pytest.skip("the shipped water example is not available")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dask_eval.py"), "--model", str(model),
                        "--systems", str(frames), "--frames-per-chunk", "15"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "LocalCluster of 2 workers" in r.stdout and "same results" in r.stdout
