"""Property-based fuzzing of what users hand minidp: training inputs, DeepPot.eval arguments, output paths.

Every mutation either changes nothing minidp reads or is refused with a ValueError/TypeError naming
what is wrong; an output is written only where nothing of the user's is lost. (Model dicts are fuzzed
in tests/test_model_check.py.) Kept small: under a minute on two cores.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidp.data import MARKER, safe_output
from minidp.model import new_model
from minidp.se_e2_a import SeAConfig
from minidp.train import TrainConfig, parse_input
from tests.test_model_check import _paths
from tests.test_train import _input

EXAMPLES = int(os.environ.get("MINIDP_FUZZ_EXAMPLES", 700))  # the 624 (key, mutation) pairs: all of them


# ---------------------------------------------------------------------------
# Training inputs
# ---------------------------------------------------------------------------

INPUT = _input()
INPUT_PATHS = [p for p in _paths(INPUT) if not any(str(k).startswith("_") for k in p)]
OTHER_TYPE = {str: [1.5, None, ["x"], {"a": 1}], int: ["3", None, True, [3]], float: ["1e-3", None, True, [1.0]],
              bool: ["false", 0, 1, None], list: ["x", 3, {"a": 1}, None], dict: ["x", [1], 3, None]}


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, len(INPUT_PATHS) - 1), st.sampled_from(["delete", "type", "nan"]), st.integers(0, 3))
def test_fuzz_training_input(index, kind, pick):
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
        config = parse_input(d)
    except (ValueError, TypeError) as err:
        keys = {str(k) for k in path if isinstance(k, str)}
        assert str(err).startswith("input"), str(err)
        assert any(k in str(err) for k in keys) or "sel has" in str(err), (path, kind, str(err))
        return
    # accepted: a deleted key took its default, a type change landed where a list item may be a string
    # or the comment keys; never a string read as a number or a bool
    # seed: null is deepmd-kit's; batch_size: a list of one size per system is deepmd-kit's too
    assert (kind == "delete" or path[-2:] == ("systems", 0) or path[-1] == "systems"
            or (path[-1] == "seed" and parent[path[-1]] is None)
            or (path[-1] == "batch_size" and isinstance(parent[path[-1]], list))), (path, kind)
    assert isinstance(config, TrainConfig)
    for name in ("start_lr", "stop_lr"):
        assert isinstance(getattr(config, name), float) and np.isfinite(getattr(config, name))
    assert isinstance(config.fitting_resnet_dt, bool) and isinstance(config.descriptor.resnet_dt, bool)
    assert all(isinstance(n, int) for n in config.descriptor.sel + config.fitting_neuron)


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
        ("no atoms", np.zeros((2, 0, 3)), c, np.zeros(0, int), False), ("bool types", x, c, TYPES.astype(bool), False),
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
