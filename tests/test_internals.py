"""The internals a reader trips over, each pinned: configurations that check themselves, nets indexed by
(centre type, neighbour type) with explicit sharing, process-wide settings confined to minidp.runtime,
checks that survive ``python -O``, statistics that leave the batch sampler alone."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest

from minidp import runtime
from minidp.model import new_model
from minidp.se_e2_a import EmbeddingNets, SeAConfig, compute_descriptor
from tests.conftest import random_model
from tests.test_train import _input, data_dir  # noqa: F401  (data_dir: a fixture)

BASE = dict(rcut=4.0, rcut_smth=1.0, sel=(3, 4), neuron=(4, 8), axis_neuron=2, type_one_side=True)


# ---------------------------------------------------------------------------
# SeAConfig validates itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, message", [
    (dict(rcut_smth=4.0), ValueError, r"rcut_smth must satisfy 0 <= rcut_smth < rcut, got rcut_smth=4.0 and rcut=4.0"),
    (dict(rcut_smth=5.0), ValueError, r"0 <= rcut_smth < rcut, got rcut_smth=5.0"),
    (dict(rcut_smth=-0.5), ValueError, r"got rcut_smth=-0.5"),
    (dict(rcut=0.0, rcut_smth=0.0), ValueError, r"rcut must be positive, got 0.0"),
    (dict(rcut="6"), ValueError, r"rcut: expected a number, got str '6'"),
    (dict(rcut=float("nan")), ValueError, r"rcut: nan is not finite"),
    (dict(axis_neuron=9), ValueError, r"axis_neuron must be an integer in 1..neuron\[-1\] = 8, got 9"),
    (dict(axis_neuron=0), ValueError, r"axis_neuron .* got 0"),
    (dict(sel=(3, 0)), ValueError, r"sel\[1\]: 0 is below 1"),
    (dict(sel=()), ValueError, r"sel: expected a list of positive integers, got tuple \(\)"),
    (dict(sel=6), ValueError, r"sel: expected a list of positive integers, got int 6"),
    (dict(neuron=(4, 2.5)), ValueError, r"neuron\[1\]: expected an integer, got float 2.5"),
    (dict(activation="swish"), ValueError, r"activation: unknown activation 'swish'; expected one of"),
    (dict(activation="silut:x"), ValueError, r"activation: activation 'silut:x': expected a number after ':'"),
    (dict(type_one_side="no"), ValueError, r"type_one_side must be true or false, got 'no'"),
])
def test_seaconfig_refuses_bad_values_by_name(change, error, message):
    with pytest.raises(error, match=message):
        SeAConfig(**{**BASE, **change})


def test_seaconfig_normalises_its_fields():
    cfg = SeAConfig(**{**BASE, "sel": [np.int64(3), 4], "neuron": [4, 8], "rcut": 4})
    assert cfg.sel == (3, 4) and isinstance(cfg.sel[0], int) and cfg.neuron == (4, 8) and cfg.rcut == 4.0


def test_a_model_file_with_rcut_smth_at_rcut_is_refused():
    """Before SeAConfig checked itself this loaded, and gave NaN forces with a RuntimeWarning."""
    from minidp.io.serialization import model_from_dict, model_to_dict

    d = model_to_dict(new_model(["O", "H"], SeAConfig(**BASE), (4,)))
    d["descriptor"]["rcut_smth"] = d["descriptor"]["rcut"]
    with pytest.raises(ValueError, match="rcut_smth must satisfy 0 <= rcut_smth < rcut"):
        model_from_dict(d)


def test_fit_config_refuses_an_unknown_activation():
    from minidp.training.tutorial import FitConfig

    with pytest.raises(ValueError, match="unknown activation 'relu7'"):
        FitConfig(activation="relu7")


# ---------------------------------------------------------------------------
# Nets by (centre type, neighbour type)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("type_one_side", [True, False])
def test_nets_are_indexed_by_type_pair_and_sharing_is_explicit(type_one_side):
    model = new_model(["O", "H"], SeAConfig(**{**BASE, "type_one_side": type_one_side}), (4,))
    nets = model.descriptor.nets
    n_params = len(model.params())
    assert len(nets) == (2 if type_one_side else 4)
    assert nets.keys() == ([(0,), (1,)] if type_one_side else [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert (nets[0, 1] is nets[1, 1]) == type_one_side
    assert nets[1] == (nets[1, 0], nets[1, 1])
    # copying entry by entry (through the accessor) keeps the parameter list: with type_one_side
    # both centre types' entries are one stored net
    for ti in range(2):
        for tj in range(2):
            nets[ti, tj] = copy.deepcopy(nets[ti, tj])
    assert len(model.params()) == n_params
    assert (nets[0, 1] is nets[1, 1]) == type_one_side
    names = [name for name, _ in model.named_nets()]
    assert names[:len(nets)] == [("embedding",) + k for k in nets.keys()] and names[-1] == ("fitting", 1)
    with pytest.raises(TypeError):
        nets[0][1] = nets[0, 0]  # rows are read-only
    with pytest.raises(IndexError, match=r"embedding net \(2, 0\) is outside types 0..1"):
        nets[2, 0]


def test_embedding_nets_refuse_a_wrong_key_set():
    net = new_model(["O"], SeAConfig(**{**BASE, "sel": (3,)}), (4,)).descriptor.nets[0, 0]
    with pytest.raises(ValueError, match=r"expected keys \[\(0, 0\), \(0, 1\), \(1, 0\), \(1, 1\)\]"):
        EmbeddingNets(2, False, {(0, 0): net})


def test_gradients_follow_the_names_after_a_deep_copy():
    """loss_and_grad's gradients are matched to nets by name, so a copied model gives the same list."""
    from minidp.training.loss import Batch, loss_and_grad
    from minidp.neighbor import build_neighbor_list

    cfg = SeAConfig(**{**BASE, "sel": (40, 40)})
    model = random_model(cfg, 0)
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 5, (1, 6, 3))
    types = np.array([0, 1, 0, 1, 1, 0])
    nl = build_neighbor_list(coords, np.eye(3)[None] * 5.0, types, cfg.rcut, cfg.sel)
    batch = Batch(nl.rij, nl.nlist, types, np.zeros(1), np.zeros((1, 6, 3)), None)
    _, g1, _ = loss_and_grad(model, batch, (1.0, 1.0, 0.0))
    _, g2, _ = loss_and_grad(copy.deepcopy(model), batch, (1.0, 1.0, 0.0))
    assert len(g1) == len(model.params()) == len(g2)
    for a, b in zip(g1, g2):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------
# Checks that survive python -O
# ---------------------------------------------------------------------------


def test_padding_before_a_neighbour_is_refused():
    model = random_model(SeAConfig(**{**BASE, "sel": (3,)}), 0)
    rij = np.zeros((1, 1, 3, 3))
    rij[0, 0, 1] = [1.0, 0.0, 0.0]
    nlist = np.array([[[-1, 0, -1]]])
    with pytest.raises(ValueError, match=r"padded slots \(-1\) must come after the real neighbours"):
        compute_descriptor(rij, nlist, np.zeros(1, int), model.descriptor, "numpy")


def test_predict_block_does_not_rely_on_the_order_of_groups():
    from minidp.model import Prediction
    from minidp.io.systems import Block
    from minidp.active.stream import predict_block

    class Shuffled:
        """A DeepPot stand-in that yields its frame groups last first."""

        def iter_eval(self, coords, cells, types, fparam=None, aparam=None):
            nf = coords.shape[0]
            for f in reversed(range(nf)):
                yield slice(f, f + 1), Prediction(np.full(1, f), np.zeros((1, 2, 3)), np.zeros((1, 9)),
                                                  np.zeros((1, 2)), np.zeros((1, 2, 9)))

    block = Block(slice(0, 3), np.zeros((3, 2, 3)), None, {})
    assert predict_block(Shuffled(), block, np.zeros(2, int)).energy.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------
# Process-wide settings
# ---------------------------------------------------------------------------


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_blas_limit_is_released_under_a_suspended_iter_eval(water_dp, water_frames):
    """The caller's loop body (and an abandoned generator) runs with the original BLAS threads."""
    from threadpoolctl import threadpool_limits

    from minidp import DeepPot

    coords, cells, types = water_frames
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        if not before:
            pytest.skip("no BLAS library to limit")
        pot = DeepPot(water_dp.model, workers=2, batch_size=192)
        gen = pot.iter_eval(coords, cells, types)
        next(gen)
        # the chunks in flight finish on their own; then no task holds the limit
        deadline = time.time() + 60
        while _blas_threads() != before and time.time() < deadline:
            time.sleep(0.05)
        assert _blas_threads() == before
        del gen


def test_malloc_tuning_opt_out(monkeypatch):
    from minidp import runtime

    monkeypatch.setenv(runtime.OPT_OUT, "0")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv(runtime.OPT_OUT)
    assert runtime.keep_freed_memory(enabled=False) is False


def test_training_does_not_use_the_inference_interface():
    """Training evaluates the model directly, never through DeepPot (imports anywhere in its files)."""
    from tests.test_layout import GRAPH

    uses = [f"{m} imports minidp.infer" for m, found in GRAPH.items()
            if m.startswith("minidp.training") for i in found if i.target == "minidp.infer"]
    assert uses == []


# ---------------------------------------------------------------------------
# Statistics leave the batch sampler alone
# ---------------------------------------------------------------------------


def test_initial_model_leaves_the_sampler_state(data_dir):
    from minidp.training.sampling import Sampler, load_systems
    from minidp.training.loop import initial_model
    from minidp.training.config import parse_input

    config = parse_input(_input(), data_dir)
    systems = load_systems(config.training.systems, config.type_map)
    sampler = Sampler(systems, config.training.batch_size, config.seed)
    state = sampler.rng.bit_generator.state
    initial_model(config, systems, sampler)
    assert sampler.rng.bit_generator.state == state


# ---------------------------------------------------------------------------
# One check, one wording, one order
# ---------------------------------------------------------------------------


def test_atom_types_are_checked_with_one_wording(water_dp):
    """DeepPot and build_neighbor_list refuse the same bad types with the same sentence (minidp.checks)."""
    from minidp.neighbor import build_neighbor_list

    coords, types = np.zeros((1, 3, 3)) + np.arange(3)[None, :, None], np.array([0, 2, 1])
    messages = []
    for call in (lambda: water_dp.eval(coords, None, types),
                 lambda: build_neighbor_list(coords, None, types, 6.0, [46, 92])):
        with pytest.raises(ValueError) as err:
            call()
        messages.append(str(err.value))
    assert messages[0] == messages[1] == "atom type 2 is outside the model's types 0..1 (got types [0, 1, 2])"


def test_physics_functions_take_no_chunk_bookkeeping():
    import inspect

    from minidp.model import energy_forces, pair_forces_virials

    # params: the frames' and atoms' fparam/aparam, inputs of the physics like the types
    assert list(inspect.signature(energy_forces).parameters) == ["rij", "nlist", "atom_types", "model", "backend",
                                                                 "params"]
    assert list(inspect.signature(pair_forces_virials).parameters) == ["g", "rij", "nlist", "backend"]


def test_the_numpy_branch_comes_first():
    """In every two-version function the readable NumPy code is written first (`if backend != "numba":`)."""
    from tests.conftest import ROOT

    offenders = [p.name for p in (ROOT / "minidp").glob("*.py") if 'if backend == "numba":' in p.read_text()]
    assert not offenders, offenders


def test_a_table_of_nets_becomes_the_collection_and_unshared_rows_are_refused():
    from minidp.se_e2_a import SeA

    model = new_model(["O", "H"], SeAConfig(**BASE), (4,))
    se = model.descriptor
    table = [list(se.nets[ti]) for ti in range(2)]
    assert SeA(se.config, se.davg, se.dstd, table).nets.keys() == [(0,), (1,)]
    table[1][0] = copy.deepcopy(table[1][0])
    with pytest.raises(ValueError, match="with type_one_side every centre type must use the same net"):
        SeA(se.config, se.davg, se.dstd, table)


@pytest.mark.parametrize("batch_size", [4, 100])
def test_deeppot_checks_its_inputs_once_not_per_chunk(monkeypatch, batch_size):
    """DeepPot checks the backend when made, the frames and the cells' geometry once per call; its chunks'
    neighbour searches and model evaluations trust them (nothing re-checked per chunk). batch_size 4 splits
    each frame over its centre atoms, 100 takes whole frames together."""
    import collections

    import minidp.infer as infer
    import minidp.neighbor as neighbor
    import minidp.se_e2_a as sea
    from minidp import checks
    from minidp.infer import DeepPot
    from minidp.model import energy_forces
    from minidp.neighbor import build_neighbor_list

    model = random_model(SeAConfig(**{**BASE, "sel": (20, 20)}), 0)
    rng = np.random.default_rng(0)
    coords, cells, types = rng.uniform(0.0, 6.0, (3, 10, 3)), np.tile(6.0 * np.eye(3), (3, 1, 1)), np.arange(10) % 2
    pot = DeepPot(model, batch_size=batch_size, workers=1)
    calls = collections.Counter()

    def counted(name, f):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checks, "check_backend", counted("backend", checks.check_backend))
    monkeypatch.setattr(sea, "check_backend", counted("backend", sea.check_backend))
    monkeypatch.setattr(sea, "check_nlist_layout", counted("nlist", sea.check_nlist_layout))
    monkeypatch.setattr(neighbor, "real_array", counted("arrays", neighbor.real_array))
    monkeypatch.setattr(infer, "check_cells", counted("cells", infer.check_cells))
    e, f, v = pot.eval(coords, cells, types)
    assert calls == {"cells": 1}
    monkeypatch.undo()
    nl = build_neighbor_list(coords, cells, types, 4.0, [20, 20])
    p = energy_forces(nl.rij, nl.nlist, types, model)
    np.testing.assert_allclose(e[:, 0], p.energy, rtol=1e-12)
    np.testing.assert_allclose(f, p.force, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_map_in_order_the_caller_one_of_the_threads(workers):
    """runtime.parallel_map: the results in the items' order for any count of items; the calling thread runs
    items 0, n, 2n, ... (n threads: n - 1 started); a piece's exception is raised once the other threads'
    pieces have ended."""
    for n_items in range(6):
        assert runtime.parallel_map(lambda x: x * x, range(n_items), workers) == [x * x for x in range(n_items)]
    caller = threading.get_ident()
    ran_here = runtime.parallel_map(lambda x: threading.get_ident() == caller, range(5), workers)
    n = min(workers, 5)
    assert ran_here == [i % n == 0 for i in range(5)]
    ended = []

    def piece(x):
        if x == 0:
            raise ValueError("piece 0")
        time.sleep(0.05)
        ended.append(x)
        return x

    with pytest.raises(ValueError, match="piece 0"):
        runtime.parallel_map(piece, [0, 1, 2], workers)
    # item 1 runs on a thread of its own (workers > 1), sleeping beyond the caller's exception
    assert sorted(ended) == ([1] if workers == 2 else [1, 2] if workers == 3 else [])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_kept_for_many_regions(workers):
    """runtime.Workers: parallel_map on the kept threads gives what a count gives, the caller one of the
    threads; submit runs a task on a kept thread; the threads end with the context; a bad count is refused."""
    caller = threading.get_ident()
    with runtime.Workers(workers) as kept:
        for n_items in range(6):
            assert runtime.parallel_map(lambda x: x + 1, range(n_items), kept) == list(range(1, n_items + 1))
        n = min(workers, 5)
        assert runtime.parallel_map(lambda x: threading.get_ident() == caller, range(5), kept) == \
            [i % n == 0 for i in range(5)]
        assert kept.submit(threading.get_ident).result() != caller
    assert runtime.worker_count(kept) == workers and runtime.worker_count(4) == 4
    with pytest.raises(RuntimeError):
        kept.submit(int)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            runtime.Workers(bad)


def test_deeppot_keeps_its_threads_from_call_to_call_and_ends_them_when_collected():
    """DeepPot's chunks run on threads kept for its lifetime (runtime.Workers), not on new ones per call,
    and those threads end once the DeepPot is garbage-collected."""
    import gc
    import pickle

    from minidp import DeepPot

    model = random_model(SeAConfig(**{**BASE, "sel": (20, 20)}), 0)
    rng = np.random.default_rng(0)
    coords, cells, types = rng.uniform(0.0, 6.0, (2, 10, 3)), np.tile(6.0 * np.eye(3), (2, 1, 1)), np.arange(10) % 2
    pot = DeepPot(model, batch_size=1, workers=2, progress=False)
    first = pot.eval(coords, cells, types)
    threads = set(pot._threads.pool._threads)
    assert 1 <= len(threads) <= 2
    again = pot.eval(coords, cells, types)
    assert set(pot._threads.pool._threads) == threads
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # a copy by pickle (OpenMM's XmlSerializer stores a DeepPot so) evaluates the same on threads of its own
    copy_ = pickle.loads(pickle.dumps(pot))
    for a, b in zip(copy_.eval(coords, cells, types), first):
        np.testing.assert_array_equal(a, b)
    assert copy_._threads is not pot._threads
    del pot, copy_
    gc.collect()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_row_block_fills_the_l2_cache_in_powers_of_two(monkeypatch):
    """se_e2_a.row_block: the largest power of two of rows whose stacked widest layer fits the L2 cache
    (float32 twice float64's), never below 64; runtime.l2_cache_bytes reads a positive size or the default."""
    import minidp.se_e2_a as sea

    monkeypatch.setattr(sea, "L2_BYTES", 2 << 20)
    assert sea.row_block(100, np.float64) == 1024 and sea.row_block(100, np.float32) == 2048
    monkeypatch.setattr(sea, "L2_BYTES", 1 << 20)
    assert sea.row_block(100, np.float64) == 512 and sea.row_block(240, np.float64) == 256
    assert sea.row_block(10**6, np.float64) == 64
    assert runtime.l2_cache_bytes() > 0



def test_deeppot_in_a_forked_process_starts_threads_of_its_own():
    """A DeepPot made before a fork (multiprocessing's default on Linux) evaluates in the child, which has
    none of the parent's threads, and gives the parent's numbers."""
    import multiprocessing

    from minidp import DeepPot

    model = random_model(SeAConfig(**{**BASE, "sel": (20, 20)}), 0)
    rng = np.random.default_rng(0)
    coords, cells, types = rng.uniform(0.0, 6.0, (2, 10, 3)), np.tile(6.0 * np.eye(3), (2, 1, 1)), np.arange(10) % 2
    pot = DeepPot(model, batch_size=1, workers=2, progress=False)
    here = pot.eval(coords, cells, types)[0]
    # the child inherits the DeepPot, threads' bookkeeping and all, by the fork (not by pickle)
    _INHERITED["pot"] = pot
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            there = pool.apply_async(_inherited_energy, (coords, cells, types)).get(timeout=120)
    finally:
        _INHERITED.clear()
    np.testing.assert_array_equal(there, here)


_INHERITED: dict = {}


def _inherited_energy(coords, cells, types):
    return _INHERITED["pot"].eval(coords, cells, types)[0]


def test_workers_travel_by_pickle_without_their_threads():
    """runtime.Workers pickles to its count: the copy runs tasks on threads of its own."""
    import pickle

    with runtime.Workers(2) as kept:
        kept.submit(int).result()
        copy_ = pickle.loads(pickle.dumps(kept))
        assert copy_.n == 2 and copy_.pool is not kept.pool
        assert copy_.submit(threading.get_ident).result() != threading.get_ident()
        copy_.close()
