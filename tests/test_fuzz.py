"""Property-based fuzzing of what users hand minidp: training inputs, DeepPot.eval arguments, output paths,
and the model tools (info, compress, change-bias, neighbor-stat) on mutated compressed models and options.

Every mutation either changes nothing minidp reads or is refused with a ValueError/TypeError naming
what is wrong; an output is written only where nothing of the user's is lost. (Model dicts are fuzzed
in tests/test_model_check.py.) Kept small: under a minute on two cores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidp.io.outputs import MARKER, safe_output
from minidp.model import new_model
from minidp.se_e2_a import SeAConfig
from minidp.training.config import TrainConfig, parse_input
from tests.test_model_check import _paths
from tests.test_train import _input, data_dir  # noqa: F401  (fixture)
from minidp.cli import main
from minidp.compress import compress_descriptor
from minidp.io.outputs import MARKER, safe_output
from minidp.infer import DeepPot
from minidp.io.serialization import load_model, model_bytes, model_from_dict, model_to_dict
from minidp.training.config import TrainConfig, parse_input
from tests.conftest import random_model
from tests.test_model_check import _mutate, _paths
from tests.test_neighbor_stat import _write as write_system
from tests.test_neighbor_stat import brute_force
from tests.test_train import _input

EXAMPLES = int(os.environ.get("MINIDP_FUZZ_EXAMPLES", 700))  # the 624 (key, mutation) pairs: all of them


# ---------------------------------------------------------------------------
# Training inputs
# ---------------------------------------------------------------------------

INPUT = _input()
INPUT_PATHS = [p for p in _paths(INPUT) if not any(str(k).startswith("_") for k in p)]
OTHER_TYPE = {str: [1.5, None, ["x"], {"a": 1}], int: ["3", None, True, [3]], float: ["1e-3", None, True, [1.0]],
              bool: ["false", 0, 1, None], list: ["x", 3, {"a": 1}, None], dict: ["x", [1], 3, None]}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(INPUT_PATHS) - 1), st.sampled_from(["delete", "type", "nan"]), st.integers(0, 3))
def test_fuzz_training_input(data_dir, index, kind, pick):
    d = copy.deepcopy(INPUT)
    path = INPUT_PATHS[index]
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    value = parent[path[-1]]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "type":
        parent[path[-1]] = OTHER_TYPE[type(value)][pick]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[path[-1]] = [np.nan, np.inf, -np.inf, -1e300][pick]
    else:
        return
    try:
        config = parse_input(d, data_dir)  # the systems are found (and for a missing type_map read) there
    except FileNotFoundError as err:  # systems made another path: named
        assert "systems" in path and "does not exist" in str(err), (path, kind, str(err))
        return
    except (ValueError, TypeError) as err:
        keys = {str(k) for k in path if isinstance(k, str)}
        assert str(err).startswith("input"), str(err)
        assert any(k in str(err) for k in keys) or "sel has" in str(err), (path, kind, str(err))
        return
    # accepted: a deleted key took its default, a type change landed where a list item may be a string
    # or the comment keys; never a string read as a number or a bool
    # seed: null is deepmd-kit's; batch_size: a list of one size per system is deepmd-kit's too
    assert (kind == "delete" or path[-2:] == ("systems", 0) or path[-1] == "systems"
            or (path[-1] in ("seed", "stop_lr") and parent[path[-1]] is None)  # stop_lr null: deepmd-kit's default
            or (path[-1] == "batch_size" and isinstance(parent[path[-1]], list))), (path, kind)
    assert isinstance(config, TrainConfig)
    for name in ("start_lr", "stop_lr"):
        assert isinstance(getattr(config.lr, name), float) and np.isfinite(getattr(config.lr, name))
    assert isinstance(config.fitting_resnet_dt, bool) and isinstance(config.descriptor.resnet_dt, bool)
    assert all(isinstance(n, int) for n in config.descriptor.sel + config.fitting_neuron)


# ---------------------------------------------------------------------------
# Training runs end to end: malformed inputs, auto_prob strings, bad labels
# ---------------------------------------------------------------------------

TRAIN_EXAMPLES = int(os.environ.get("MINIDP_FUZZ_TRAIN_EXAMPLES", "40"))
# (system, set, frames in the set, values per frame) of the label and coordinate files of data_dir
FILES = {("sys_a", "set.000"): 3, ("sys_a", "set.001"): 3, ("sys_b", "set.000"): 4}
WIDTH = {"energy": 1, "force": 36, "virial": 9, "coord": 36, "box": 9}
BLOCK = st.tuples(st.sampled_from(["-1", "0", "1", "2", "3", "x", "1.5", ""]),
                  st.sampled_from(["0", "1", "2", "3", "x"]),
                  st.sampled_from(["1", "0", "0.5", "-1", "nan", "inf", "w", "1e400"]))
AUTO_PROB = st.one_of(
    st.sampled_from(["prob_uniform", "prob_sys_size", "prob_sys_size;", "prob_size", "", "prob_sys_size;0:2"]),
    st.lists(BLOCK, min_size=1, max_size=3).map(lambda bs: "prob_sys_size;" + ";".join(":".join(b) for b in bs)))


def _tree(root: Path, skip: str = "w") -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if p.relative_to(root).parts[0] != skip}


class Expect(NamedTuple):
    """What a drawn training case may give: a refusal containing one of ``messages`` (any one-line
    refusal if None), and whether it may also train."""

    messages: tuple[str, ...] | None
    may_train: bool


def _train_case(data, root: Path) -> Expect:
    """Draw one malformed (or fine) training case into root: input.json and the systems."""
    d = copy.deepcopy(INPUT)
    d["training"].update(numb_steps=2, save_freq=1, disp_freq=1)
    kind = data.draw(st.sampled_from(["value", "auto_prob", "label", "sys_probs"]), label="kind")
    expect = Expect(("input",), False)
    if kind == "value":
        path = data.draw(st.sampled_from(INPUT_PATHS), label="key")
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        parent[path[-1]] = data.draw(st.sampled_from(OTHER_TYPE[type(old)] + [np.nan, -1, 0, 1e300]), label="value")
        # a seed of null is deepmd-kit's; a huge number where a number may be large can train or diverge;
        # a loss prefactor of 0 switches its term off, as in deepmd-kit
        value = parent[path[-1]]
        # stop_lr null or 0: deepmd-kit's too (null: its default 5e-8; 0: decays to 1e-10, then 0)
        fine = (path[-1] == "seed" or value == 1e300 or (path[-1] == "stop_lr" and (value is None or value == 0)) or (path[0] == "loss" and value == 0 and value is not False)
                or (path[-1] == "batch_size" and isinstance(value, list)))  # one per system: deepmd-kit's too
        # a string for systems is a folder to search (deepmd-kit's too): one that is not there is named
        expect = Expect(("input", "training stopped", "does not exist"), fine)
    elif kind == "auto_prob":
        d["training"]["training_data"]["auto_prob"] = data.draw(AUTO_PROB, label="auto_prob")
        expect = Expect(("input: training/training_data/auto_prob",), True)
    elif kind == "sys_probs":
        d["training"]["training_data"]["sys_probs"] = data.draw(
            st.lists(st.sampled_from([0.5, -1, 0.0, 1.0, 0.7, np.nan, "0.5", True]), min_size=1, max_size=3),
            label="sys_probs")
        expect = Expect(("input: training/training_data/sys_probs",), True)
    else:
        (system, set_name), n = data.draw(st.sampled_from(sorted(FILES.items())), label="file")
        stem = data.draw(st.sampled_from(sorted(WIDTH)), label="stem")
        frame, entry = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, WIDTH[stem] - 1))
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e300]), label="value")
        f = root / system / set_name / f"{stem}.npy"
        a = np.load(f)
        a.reshape(n, -1)[frame, entry] = value
        np.save(f, a)
        # a finite but absurd label or coordinate: refused (cell, neighbours), stopped (diverged) or trained
        # named by the reader evaluation uses too: the file and its frame
        expect = (Expect((f"{root / system / set_name / stem}.npy: frame {frame} ",), False) if not np.isfinite(value)
                  else Expect(None, True))
    (root / "input.json").write_text(json.dumps(d, allow_nan=True))
    return expect


@settings(max_examples=TRAIN_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_training_runs(data_dir, data):
    """minidp train on a drawn case: exit 2 with one line naming the problem, or a model minidp loads;
    no traceback; the input and the systems unchanged; nothing left in the workdir but whole outputs."""
    from minidp.cli import main
    from minidp.io.serialization import load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("sys_a", "sys_b"):
            shutil.copytree(data_dir / name, root / name)
        expect = _train_case(data, root)
        before, w = _tree(root), root / "w"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["train", str(root / "input.json"), "-o", str(w / "m.dp"), "--workdir", str(w), "-q"])
        assert _tree(root) == before, "an input changed"
        lines = err.getvalue().splitlines()
        if status == 0:
            assert expect.may_train and lines == [], (expect, lines)
            assert np.isfinite(load_model(w / "m.dp").bias).all()
            assert sorted(p.name for p in w.iterdir()) == ["lcurve.out", "lcurve.png", "m.dp", "model.ckpt-1.dp",
                                                           "model.ckpt-1.npz", "model.ckpt-2.dp", "model.ckpt-2.npz"]
            return
        assert status == 2 and len(lines) == 1 and lines[0].startswith("minidp train: error: "), lines
        message = lines[0].removeprefix("minidp train: error: ")
        assert expect.messages is None or any(m in message for m in expect.messages), (expect, message)
        # refused before the run, or stopped in it: no model, no temporary or lock file
        assert not w.exists() or not [p for p in w.iterdir() if p.name == "m.dp" or p.name.startswith(".")]


# ---------------------------------------------------------------------------
# DeepPot.eval arguments
# ---------------------------------------------------------------------------

MODEL = new_model(["O", "H"], SeAConfig(3.0, 0.5, (4, 6), (2, 4), 2, True), (4, 4), seed=1)
X = np.array([[[0.0, 0, 0], [1.0, 0.1, 0], [0.2, 1.1, 0.1]], [[0.1, 0, 0], [1.1, 0.2, 0], [0.1, 1.0, 0.3]]])
CELLS = np.tile(np.eye(3) * 6.0, (2, 1, 1))
TYPES = np.array([0, 1, 1])


def _mutations(draw_int):
    """(name, coords, cells, atom_types, same): same = the arguments mean the reference frames."""
    x, c, t = X.copy(), CELLS.copy(), TYPES.copy()
    k = draw_int
    table = [
        ("flat coords", X.reshape(2, 9), c, t, True), ("cells as 9", x, CELLS.reshape(2, 9), t, True),
        ("types per frame", x, c, np.tile(TYPES, (2, 1)), True), ("float32 coords", X.astype(np.float32), c, t, None),
        ("nan coord", np.where(np.arange(18).reshape(2, 3, 3) == 7, np.nan, X), c, t, False),
        ("inf cell", x, np.where(np.arange(18).reshape(2, 3, 3) == 4, np.inf, CELLS), t, False),
        ("short coords", X.reshape(-1)[:-1], c, t, False), ("string coords", X.astype(str), c, t, False),
        ("bool coords", X > 0.5, c, t, False), ("float types", x, c, TYPES.astype(float), False),
        ("type out of range", x, c, np.array([0, 1, 2]), False), ("negative type", x, c, np.array([0, -1, 1]), False),
        ("too few types", x, c, TYPES[:2], False), ("three rows of types", x, c, np.tile(TYPES, (3, 1)), False),
        ("one cell for two frames", x, CELLS[:1], t, False), ("singular cell", x, np.zeros((2, 3, 3)), t, False),
        ("atoms on one spot", np.concatenate([X[:, :1], X[:, :1], X[:, 2:]], axis=1), c, t, False),
        ("no atoms", np.zeros((2, 0, 3)), c, np.zeros(0, int), "zeros"), ("bool types", x, c, TYPES.astype(bool), False),
    ]
    return table[k % len(table)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 18), st.sampled_from([None, 1, 3]))
def test_fuzz_deeppot_eval_arguments(k, batch_size):
    from minidp.infer import DeepPot

    dp = DeepPot(MODEL, progress=False, batch_size=batch_size, workers=1)
    name, x, c, t, same = _mutations(k)
    try:
        e, f, v = dp.eval(x, c, t)
    except (ValueError, TypeError) as err:
        assert same is not True, (name, str(err))
        assert any(w in str(err) for w in ("coords", "cells", "atom_types", "atom type", "cell of frame", "same spot")), \
            (name, str(err))
        return
    assert same is not False, name
    if same == "zeros":  # frames of no atoms are valid, as in deepmd-kit: energy 0, no forces
        assert np.array_equal(e, np.zeros((2, 1))) and f.shape == (2, 0, 3) and not v.any(), name
        return
    e_ref, f_ref, _ = dp.eval(X, CELLS, TYPES)
    np.testing.assert_allclose(e, e_ref, rtol=1e-6)
    assert np.isfinite(f).all() and np.isfinite(v).all()


# ---------------------------------------------------------------------------
# Output paths
# ---------------------------------------------------------------------------

TARGETS = ["new", "sys", "sys/set.000", ".", "proj", "proj/notes.txt", "prev", "f.txt", "f.txt/sub", "empty",
           "empty_file", "deep/new/out", "prev_edited", "sys/new"]


def _layout(root: Path) -> None:
    """An input system, a user's project, a previous minidp output (and one a user added to), files."""
    (root / "sys" / "set.000").mkdir(parents=True)
    (root / "sys" / "type.raw").write_text("0\n")
    np.save(root / "sys" / "set.000" / "coord.npy", np.zeros((1, 3)))
    (root / "proj").mkdir()
    (root / "proj" / "notes.txt").write_text("a day's work")
    for name in ("prev", "prev_edited"):
        (root / name / "set.000").mkdir(parents=True)
        (root / name / "type.raw").write_text("0\n")
        (root / name / MARKER).write_text("deepmd/npy\n")
    (root / "prev_edited" / "mine.txt").write_text("added by hand")
    (root / "f.txt").write_text("file")
    (root / "empty").mkdir()
    (root / "empty_file").write_text("")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TARGETS), st.booleans(), st.sampled_from(["deepmd/npy", "descriptors"]))
def test_fuzz_output_paths(target, overwrite, kind):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _layout(root)
        before = _snapshot(root)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with safe_output(target, kind, inputs=[root / "sys"], overwrite=overwrite) as out:
                out.mkdir()
                (out / "type.raw").write_text("1\n")
            written = True
        except ValueError as err:
            assert str(err).startswith("output"), str(err)
            written = False
        finally:
            os.chdir(cwd)
        after = _snapshot(root)
        if not written:
            assert after == before, target
            return
        # only the target changed; it was new, empty, or (overwrite) a previous output of this kind
        assert target in ("new", "empty", "deep/new/out") or (overwrite and target == "prev" and kind == "deepmd/npy"), \
            (target, overwrite, kind)
        changed = {p for p in set(before) | set(after) if before.get(p, 0) != after.get(p, 0)}
        assert all(p == target or p.startswith(target + "/") or target.startswith(p + "/") for p in changed), changed
        assert not [p for p in after if Path(p).name.startswith(f".{Path(target).name}.")], "temporary left behind"


# ---------------------------------------------------------------------------
# The model tools: info, compress, change-bias, neighbor-stat
# ---------------------------------------------------------------------------

TOOL_EXAMPLES = int(os.environ.get("MINIDP_FUZZ_TOOL_EXAMPLES", 40))
TOOL_MODEL = random_model(SeAConfig(4.0, 2.0, (4, 4), (2, 4), 2, False), 7)
TOOL_MODEL.type_map = ["O", "H"]
PLAIN = {"model": model_to_dict(TOOL_MODEL), "@variables": {"min_nbor_dist": np.array(0.8)}}
COMPRESSED = {"model": model_to_dict(replace(TOOL_MODEL, descriptor=compress_descriptor(TOOL_MODEL.descriptor, 0.8,
                                                                                        0.05))),
              "@variables": {"min_nbor_dist": np.array(0.8)}}
# every key path a reader of a compressed model looks at beyond the plain model's (fuzzed in test_model_check)
TOOL_PATHS = [p for p in _paths(COMPRESSED) if p[:3] == ("model", "descriptor", "compress") or p[0] == "@variables"]
FRAME = (np.array([[[0.0, 0, 0], [1.0, 0.2, 0], [0.1, 1.1, 0.3], [1.2, 1.0, 0.9], [2.0, 0.1, 0.5]]]),
         np.eye(3)[None] * 6.0, np.array([0, 1, 1, 0, 1]))  # smallest distance 0.98 A


def _energy(model) -> np.ndarray:
    e, f, _ = DeepPot(model, progress=False).eval(*FRAME)
    return np.concatenate([e.ravel(), f.ravel()])


TOOL_REFERENCE = {"exact": _energy(TOOL_MODEL), "compressed": None}


def _run(argv: list[str]) -> tuple[int, list[str], str]:
    """main(argv) in this process: (exit status, stderr lines, stdout). An exception other than the
    ones main turns into one line escapes, and fails the test (a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, [line for line in err.getvalue().splitlines() if line.strip()], out.getvalue()


def _mutated(data: dict, path: tuple, kind: str, rng) -> dict:
    data = copy.deepcopy(data)
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    if kind == "delete":
        parent.pop(path[-1])
    elif kind == "value" and "compress_data" in path:  # another finite coefficient is another table, not an error
        return data
    elif kind == "shape" and isinstance(parent[path[-1]], np.ndarray) and parent[path[-1]].ndim == 0:  # two, none
        parent[path[-1]] = np.array([parent[path[-1]]] * 2 if rng.random() < 0.5 else [])
    elif kind == "value" and isinstance(parent[path[-1]], np.ndarray) and parent[path[-1]].size:
        value = parent[path[-1]].astype(float).copy()
        value.reshape(-1)[rng.integers(value.size)] = [0.0, -1.0, 0.5, 1e300, 100.0][rng.integers(5)]
        parent[path[-1]] = value
    else:
        parent[path[-1]] = _mutate(parent[path[-1]], kind, rng)
    return data


@contextlib.contextmanager
def _folder(files: dict):
    """A scratch folder holding ``files`` (name -> bytes); on the way out, the inputs must be unchanged
    and nothing but the named output may have appeared."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, content in files.items():
            (root / name).write_bytes(content)
        yield root
        for name, content in files.items():
            assert (root / name).read_bytes() == content, f"input {name} changed"


def _check_run(rc: int, err: list[str], command: str, root: Path, inputs: set, output: str | None) -> None:
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert len(err) == 1 and err[0].startswith(f"minidp {command}: error: "), err
    left = {p.name for p in root.iterdir()} - inputs
    assert left == ({output} if rc == 0 and output else set()), left


@settings(max_examples=TOOL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(TOOL_PATHS) - 1), st.sampled_from(["delete", "type", "shape", "nan", "inf", "value"]),
       st.integers(0, 2**32 - 1), st.sampled_from(["info", "change-bias"]))
def test_fuzz_mutated_compressed_models_through_the_tools(index, kind, seed, command):
    """A mutated compressed model: refused in one line naming the file, or read as exactly the same model."""
    if TOOL_REFERENCE["compressed"] is None:
        TOOL_REFERENCE["compressed"] = _energy(model_from_dict(COMPRESSED))
    data = _mutated(COMPRESSED, TOOL_PATHS[index], kind, np.random.default_rng(seed))
    with _folder({"m.json": model_bytes(data, ".json")}) as root:
        model = str(root / "m.json")
        argv = ["info", model] if command == "info" else ["change-bias", model, "-b", "1", "2", "-o",
                                                           str(root / "new.dp")]
        rc, err, _ = _run(argv)
        _check_run(rc, err, command, root, {"m.json"}, "new.dp" if command == "change-bias" else None)
        if rc == 2:
            assert "m.json" in err[0], err
            return
        loaded = load_model(model)
        # without its compress entry (deleted, None) the file holds the exact model, its nets intact
        reference = TOOL_REFERENCE["exact" if loaded.descriptor.compress is None else "compressed"]
        np.testing.assert_array_equal(_energy(loaded), reference,
                                      err_msg=f"{TOOL_PATHS[index]} {kind}: accepted, and not the same model")
        if command == "change-bias":
            new = load_model(root / "new.dp")
            assert new.bias.tolist() == [1.0, 2.0]
            assert (new.descriptor.compress is None) == (loaded.descriptor.compress is None)
            for a, b in zip(*(m.descriptor.compress.tables if m.descriptor.compress else () for m in (new, loaded)),
                            strict=True):
                assert np.array_equal(a.coef, b.coef) and np.array_equal(a.info, b.info)


STEPS = ["0.01", "0.05", "0.1", "0.03", "1e-7", "-0.01", "nan", "inf", "0"]
EXTRAPOLATES = ["5", "2", "1", "0.5", "1e9", "nan", "5.05"]
RMINS = [None, "0.5", "0.8", "3.5", "4", "100", "1e-4", "-1", "nan", "inf"]
STORED = [0.8, None, "abc", [], {}, 100.0, np.nan, [0.5, 0.6], 0.6]


@settings(max_examples=TOOL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(STEPS), st.sampled_from(EXTRAPOLATES), st.sampled_from(RMINS), st.sampled_from(STORED))
def test_fuzz_compress_options_and_stored_distance(step, extrapolate, rmin, stored):
    """compress: refused in one line, or a table of the distance the user gave (else the model's) whose
    energies are the exact model's wherever no pair is closer than that distance."""
    data = copy.deepcopy(PLAIN)
    data["@variables"] = {} if stored is None else {"min_nbor_dist": stored}
    with _folder({"m.json": model_bytes(data, ".json")}) as root:
        argv = ["compress", "-i", str(root / "m.json"), "-o", str(root / "c.dp"), "-s", step, "-e", extrapolate]
        rc, err, _ = _run(argv + ([] if rmin is None else ["--min-nbor-dist", rmin]))
        _check_run(rc, err, "compress", root, {"m.json"}, "c.dp")
        if rc == 2:
            return
        used = float(rmin) if rmin is not None else float(stored)
        assert 0 < used < 4.0 and float(step) > 0 and float(extrapolate) > 1
        model = load_model(root / "c.dp")
        assert model.descriptor.compress.min_nbor_dist == used
        e = _energy(model)
        assert np.isfinite(e).all()
        if used <= 0.98:  # every pair of the frame is inside the first table
            np.testing.assert_allclose(e, TOOL_REFERENCE["exact"], rtol=1e-6, atol=1e-7)


@settings(max_examples=TOOL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["3", "4", "inf", "nan", "-1", "0", "1e5"]),
       st.sampled_from([None, ["O", "H"], ["H", "O"], ["O", "O", "H"], ["O"], ["O", "H", "C"]]),
       st.sampled_from([None, "nan cell", "singular cell", "nan coord", "same spot"]), st.integers(0, 4))
def test_fuzz_neighbor_stat(rcut, type_map, bad, frame):
    """neighbor-stat: refused in one line (naming the system and frame of a bad frame), or the brute-force
    statistics."""
    rng = np.random.default_rng(frame)
    cells, coords, types = np.tile(np.eye(3) * 5.0, (5, 1, 1)), rng.uniform(0, 5, (5, 6, 3)), np.array([0, 1] * 3)
    if bad == "nan cell":
        cells[frame, 2, 2] = np.nan
    elif bad == "singular cell":
        cells[frame, 2] = cells[frame, 0]
    elif bad == "nan coord":
        coords[frame, 1, 1] = np.inf
    elif bad == "same spot":
        coords[frame, 3] = coords[frame, 0]
    with tempfile.TemporaryDirectory() as tmp:
        system = write_system(Path(tmp) / "sys", coords, cells, types, names=("O", "H"))
        rc, err, out = _run(["neighbor-stat", "-s", system, "-r", rcut] + (["-t", *type_map] if type_map else []))
    assert rc in (0, 2) and (rc == 0 or (len(err) == 1 and err[0].startswith("minidp neighbor-stat: error: ")))
    valid = rcut in ("3", "4") and type_map not in (["O", "O", "H"], ["O"])
    assert (rc == 0) == (valid and bad is None), (rcut, type_map, bad, err)
    if bad is not None and valid:
        assert str(system) in err[0] and f"frame {frame}" in err[0], err  # the system or its file, and the frame
    if rc == 0:
        names = type_map or ["O", "H"]
        d, c = brute_force(coords, cells, np.array([names.index("OH"[t]) for t in types]), float(rcut), len(names))
        assert f"min_nbor_dist: {d:f}" in out and f"max_nbor_size: {np.array(c)!s}" in out, out
