"""Descriptor options, deepmd-kit's names: exclude_types (with and without type_one_side), the model's
pair_exclude_types, env_protection, set_davg_zero, and every activation.

First minidp alone: each option is its definition on the reference path (the rows, the neighbour list),
the fast paths and the compressed path agree with it, forces and virials are derivatives of the energy,
and the options are read, checked, shown and written back. Then against deepmd-kit: small random models
built with its backend-neutral dpmodel code (energies to 1e-10 of the largest value; its DeepPot gives
NaN forces, so forces are checked against differences of minidp's energy), its compression, and its
TensorFlow backend where the two disagree (exclude_types with type_one_side: see
test_tf_and_dpmodel_differ_by_the_empty_slots_of_excluded_sections).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidp.cli import main
from minidp.compress import Table, compress_descriptor, table_features
from minidp.training.force_training import env_matrix_jvp
from minidp.infer import DeepPot
from minidp.model import energy_forces, predict_frames
from minidp.neighbor import build_neighbor_list
from minidp.nn import ACTIVATIONS
from minidp.se_e2_a import (SeAConfig, check_descriptor_inputs, compute_descriptor, drop_excluded_pairs,
                            env_matrix, env_matrix_backward, exclusion_mask, smooth_switch)
from minidp.io.serialization import _encode_arrays, load_model, model_from_dict, model_to_dict, save_model
from minidp.stats import env_stats
from minidp.training.config import parse_input
from tests.conftest import WATER, need, random_model, rel_err
from tests.test_model import FLOOR, TOL, H, Spec, energy, make, needed_sel, predict, specs, strained

# every activation deepmd-kit accepts, and silut with its tail reached (its inputs here stay below 3)
NAMES = sorted(ACTIVATIONS) + ["silut:3.0", "silut:0.5", "custom_silu:-0.5"]
SMOOTH = [n for n in NAMES if n.split(":")[0] not in ("relu", "relu6")]
PROTECTIONS = [0.0, 1e-8, 1e-2, 0.3]


@st.composite
def option_specs(draw, names=NAMES, max_atoms=10):
    """A test_model.Spec whose configuration carries options drawn for its number of types."""
    spec = draw(specs(max_atoms=max_atoms))
    nt = spec.cfg.ntypes
    pairs = st.lists(st.tuples(st.integers(0, nt - 1), st.integers(0, nt - 1)), max_size=2)
    cfg = dataclasses.replace(spec.cfg, exclude_types=draw(pairs), pair_exclude_types=draw(pairs),
                              env_protection=draw(st.sampled_from(PROTECTIONS)),
                              activation=draw(st.sampled_from(names)), set_davg_zero=draw(st.booleans()))
    return dataclasses.replace(spec, cfg=cfg)


def random_rows(cfg: SeAConfig, seed: int):
    """(types, nlist, rij) of 2 frames of 3 atoms: per section some real neighbours first, then padding."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, cfg.ntypes, 3)
    nlist = np.full((2, 3, cfg.nnei), -1)
    for f, i, t in np.ndindex(2, 3, cfg.ntypes):
        n = rng.integers(0, cfg.sel[t] + 1)
        nlist[f, i, cfg.slots(t).start:cfg.slots(t).start + n] = rng.integers(0, 3, n)
    rij = rng.normal(0.0, 1.2, (2, 3, cfg.nnei, 3)) * (nlist >= 0)[..., None]
    return types, nlist, rij


# ---------------------------------------------------------------------------
# Each option is its definition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("p", PROTECTIONS)
def test_protected_rows_are_the_formula_and_their_derivatives_are_exact(backend, p):
    """R~ = s(r) (1/(r+p), x/(r+p)^2): rows, backward and force training's tangent against differences,
    with an excluded pair (its real rows zero and frozen, its padded slots -davg/dstd)."""
    cfg = SeAConfig(4.0, 1.0, (3, 4), (4,), 2, True, exclude_types=((0, 1),), env_protection=p)
    se = random_model(cfg, 3, per_slot=True).descriptor
    types, nlist, rij = random_rows(cfg, 5)
    excluded = exclusion_mask(types, cfg.exclude_types, cfg.sel)

    def rows(x):
        return env_matrix(x, nlist, types, se.davg, se.dstd, cfg.rcut_smth, cfg.rcut, backend, protection=p,
                          excluded=excluded)

    R, cache = rows(rij)
    # (nf, nloc, nnei, 1)  padded slots at r = 1, their rows masked below
    r = np.where((nlist >= 0)[..., None], np.linalg.norm(rij, axis=-1, keepdims=True), 1.0)
    sw = smooth_switch(r, cfg.rcut_smth, cfg.rcut)[0]
    raw = np.concatenate([sw / (r + p), sw * rij / (r + p) ** 2], axis=-1) * (nlist >= 0)[..., None]
    want = np.where((excluded & (nlist >= 0))[..., None], 0.0, (raw - se.davg[types]) / se.dstd[types])
    assert rel_err(R, want) <= 1e-14
    rng = np.random.default_rng(7)
    dR, drij = rng.normal(size=R.shape), rng.normal(size=rij.shape) * (nlist >= 0)[..., None]
    fd = (rows(rij + H * drij)[0] - rows(rij - H * drij)[0]) / (2 * H)
    assert rel_err(env_matrix_jvp(drij, cache), fd) <= TOL
    assert abs(np.sum(env_matrix_backward(dR, cache, backend) * drij) - np.sum(dR * fd)) <= TOL * np.abs(dR * fd).sum()


def test_pair_exclusion_is_the_neighbour_list_without_those_pairs():
    """pair_exclude_types = the plain model on the list with the pairs' slots emptied (deepmd-kit's nlist
    rewrite); exclude_types differs: the excluded rows are zero, not the padded row -davg/dstd."""
    cfg = SeAConfig(4.0, 1.0, (3, 4), (4, 8), 2, False)
    model = random_model(cfg, 2)
    types, nlist, rij = random_rows(cfg, 4)
    dropped = drop_excluded_pairs(nlist, rij, types, dataclasses.replace(cfg, pair_exclude_types=((0, 1),)))
    assert (dropped.nlist[:, types == 0][..., cfg.slots(1)] == -1).all()
    assert (dropped.rij[dropped.nlist < 0] == 0).all() and (dropped.nlist[nlist < 0] == -1).all()
    plain = energy_forces(dropped.rij, dropped.nlist, types, model, "reference")
    opt = dataclasses.replace(model, descriptor=dataclasses.replace(
        model.descriptor, config=dataclasses.replace(cfg, pair_exclude_types=((1, 0),))))
    for backend in ("reference", "numpy", "numba"):
        got = energy_forces(rij, nlist, types, opt, backend)
        for mine, theirs in zip(got, plain):
            assert rel_err(mine, theirs, FLOOR) <= 1e-13


@pytest.mark.parametrize("type_one_side", [True, False])
def test_an_excluded_neighbour_moves_nothing_but_counts(type_one_side):
    """With exclude_types the pair adds nothing, whatever its distance; but it takes a padded slot away, so
    the energy steps when it crosses rcut (deepmd-kit's dpmodel, which minidp follows; its TF backend
    empties the whole section and does not step). pair_exclude_types never steps."""
    cfg = SeAConfig(3.0, 1.0, (4, 4), (4, 8), 2, type_one_side, exclude_types=((0, 1),))
    model = random_model(cfg, 6)
    paired = dataclasses.replace(model, descriptor=dataclasses.replace(
        model.descriptor, config=dataclasses.replace(cfg, exclude_types=(), pair_exclude_types=((0, 1),))))
    types = np.array([0, 0, 1])

    def e(m, d):
        """Atom 2 (type 1) at distance d from atom 0, d + 1.1 from atom 1."""
        return energy(m, np.array([[[0.0, 0, 0], [1.1, 0, 0], [-d, 0, 0]]]), None, types)

    assert abs(e(model, 1.2) - e(model, 1.8)) <= 1e-13 * abs(e(model, 1.2))
    assert abs(e(paired, 1.2) - e(paired, 1.8)) <= 1e-13 * abs(e(paired, 1.2))
    # one padded slot's G(s)^T R more in atoms 0 and 2 (s their padded rows' -davg/dstd)
    assert abs(e(model, 2.999) - e(model, 3.001)) > 1e-6
    assert abs(e(paired, 2.999) - e(paired, 3.001)) <= 1e-13 * abs(e(paired, 1.2))


# ---------------------------------------------------------------------------
# All paths, and the derivatives
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(spec=option_specs())
def test_fast_paths_equal_the_reference_path(spec):
    model, coords, cells, types = make(spec)
    ref, Dref = predict(model, coords, cells, types, "reference")
    for backend in ("numpy", "numba"):
        got, D = predict(model, coords, cells, types, backend)
        assert rel_err(D, Dref) <= 1e-12
        for mine, theirs in zip(got, ref):
            assert rel_err(mine, theirs, FLOOR) <= 1e-12


def clear_of_the_cutoff(spec, coords, cells, types) -> bool:
    """No pair within 1e-3 A of rcut: with exclude_types, deepmd-kit's rule (an excluded neighbour takes an
    empty slot's place) makes the energy jump where a neighbour crosses rcut, so a difference across it
    measures the jump, not the force."""
    if not spec.cfg.exclude_types:
        return True
    rcut = spec.cfg.rcut
    nl = build_neighbor_list(coords, cells, types, rcut + 1e-2, (coords.size,) * len(spec.cfg.sel))
    r = np.linalg.norm(nl.rij, axis=-1)[nl.nlist >= 0]
    return not np.any(np.abs(r - rcut) < 1e-3)

@settings(max_examples=40, deadline=None)
@given(spec=option_specs(), seed=st.integers(0, 1000))
def test_forces_and_virial_are_derivatives_of_the_energy(spec, seed):
    """Along a random displacement d of the atoms, dE = -F . d; along a random strain eps, dE = -W : eps."""
    model, coords, cells, types = make(spec)
    assume(clear_of_the_cutoff(spec, coords, cells, types))
    p, _ = predict(model, coords, cells, types)
    rng = np.random.default_rng(seed)
    d = rng.normal(size=coords.shape)
    slope = (energy(model, coords + H * d, cells, types) - energy(model, coords - H * d, cells, types)) / (2 * H)
    assert abs(slope + np.sum(p.force * d)) <= TOL * max(np.abs(p.force).sum(), FLOOR)
    eps = rng.normal(size=(3, 3))
    slope = (energy(model, strained(coords, H * eps), strained(cells, H * eps), types)
             - energy(model, strained(coords, -H * eps), strained(cells, -H * eps), types)) / (2 * H)
    assert abs(slope + np.sum(p.virial[0] * eps.reshape(-1))) <= TOL * max(np.abs(p.virial).sum() * 3, FLOOR)


def compressed(model, coords, cells, types, step=0.001):
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, cfg.sel)
    r = np.linalg.norm(nl.rij, axis=-1)[nl.nlist >= 0]
    rmin = float(r.min()) if r.size else 1.0
    return dataclasses.replace(model, descriptor=compress_descriptor(model.descriptor, rmin, step))


@settings(max_examples=25, deadline=None)
@given(spec=option_specs())
def test_compressed_path_with_options(spec):
    """The fused kernels equal the readable tables; the tables equal the nets to their accuracy (a kinked
    activation, relu or relu6, is checked through its derivatives only: a quintic cannot follow a kink)."""
    model, coords, cells, types = make(spec)
    cm = compressed(model, coords, cells, types)
    p, D = predict(cm, coords, cells, types, "numba")
    q, Dq = predict(cm, coords, cells, types, "numpy")
    assert rel_err(Dq, D) <= 1e-13
    for mine, theirs in zip(q, p):
        assert rel_err(mine, theirs, FLOOR) <= 1e-12
    if spec.cfg.activation in SMOOTH:
        exact, De = predict(model, coords, cells, types)
        assert rel_err(D, De) <= 1e-7
        assert rel_err(p.force, exact.force, FLOOR) <= 1e-6
    d = np.random.default_rng(spec.seed).normal(size=coords.shape)
    assume(clear_of_the_cutoff(spec, coords, cells, types))
    slope = (energy(cm, coords + H * d, cells, types) - energy(cm, coords - H * d, cells, types)) / (2 * H)
    assert abs(slope + np.sum(p.force * d)) <= TOL * max(np.abs(p.force).sum(), FLOOR)


# ---------------------------------------------------------------------------
# Configuration, files, statistics, training
# ---------------------------------------------------------------------------


def test_configuration_is_checked_and_canonical():
    base = dict(rcut=4.0, rcut_smth=1.0, sel=(3, 4), neuron=(4,), axis_neuron=2, type_one_side=True)
    cfg = SeAConfig(**base, exclude_types=[[1, 0], [0, 1], (1, 1)], activation="SiLUT:3.0")
    assert cfg.exclude_types == ((0, 1), (1, 1)) and cfg == SeAConfig(**base, exclude_types=((1, 1), (0, 1)),
                                                                        activation="SiLUT:3.0")
    for bad, message in [(dict(exclude_types=[[0, 2]]), "exclude_types: [0, 2] is not a pair of types in 0..1"),
                         (dict(pair_exclude_types=[[0]]), "pair_exclude_types: [0] is not a pair"),
                         (dict(exclude_types="01"), "exclude_types must be a list of pairs"),
                         (dict(env_protection=-0.1), "env_protection: -0.1 is below 0.0"),
                         (dict(env_protection="0.1"), "env_protection: expected a number, got str"),
                         (dict(set_davg_zero=1), "set_davg_zero must be true or false"),
                         (dict(activation="silut:x"), "expected a number after ':'"),
                         (dict(activation="swish"), "unknown activation 'swish'")]:
        with pytest.raises(ValueError, match="^se_e2_a") as err:
            SeAConfig(**base, **bad)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_training_takes_the_descriptor_options_and_honours_set_davg_zero():
    """exclude_types, pair_exclude_types, env_protection pass the training checks (their weight gradients:
    tests/test_loss_terms.py)."""
    cfg = SeAConfig(4.0, 1.0, (3, 4), (4,), 2, True)
    for option in (dict(exclude_types=((0, 1),)), dict(pair_exclude_types=((1, 1),)), dict(env_protection=0.01)):
        se = random_model(dataclasses.replace(cfg, **option), 1).descriptor
        assert check_descriptor_inputs(np.full((1, 2, 7), -1), se, "numba", keep=True) == "numba"
    sums = np.array([[3.0, 5.0, 0.6, 2.0, 10.0], [1.0, 2.0, 0.3, 1.0, 4.0]])
    davg, dstd = env_stats(sums, cfg)
    zero_avg, same_std = env_stats(sums, dataclasses.replace(cfg, set_davg_zero=True))
    assert davg[..., 0].min() > 0 and (zero_avg == 0).all() and (same_std == dstd).all()
    d = {"model": {"type_map": ["O", "H"], "descriptor": {"type": "se_e2_a", "sel": [3, 4], "rcut": 4.0,
                                                         "set_davg_zero": True}, "fitting_net": {}},
         "learning_rate": {"start_lr": 1e-3}, "loss": {},
         "training": {"training_data": {"systems": [str(need(WATER / "data_0"))]}, "numb_steps": 1}}
    assert parse_input(d).descriptor.set_davg_zero
    d["model"]["descriptor"]["set_davg_zero"] = "true"
    with pytest.raises(TypeError, match="set_davg_zero: expected true or false"):
        parse_input(d)


OPTIONS = SeAConfig(3.0, 0.5, (3, 4), (2, 4), 2, False, activation="silut:2.5", exclude_types=((0, 1),),
                    env_protection=0.01, set_davg_zero=True, pair_exclude_types=((1, 1),))


@pytest.mark.parametrize("suffix", [".dp", ".yaml", ".json"])
def test_options_round_trip_and_show_in_info(suffix, tmp_path, capsys):
    model = random_model(OPTIONS, 8)
    x = np.array([[[0.0, 0, 0], [1.0, 0.2, 0], [0.1, 1.1, 0.3], [1.2, 1.0, 0.9], [2.0, 0.1, 0.5]]])
    types = np.array([0, 1, 1, 0, 1])
    save_model(tmp_path / f"m{suffix}", model)
    back = load_model(tmp_path / f"m{suffix}")
    assert back.descriptor.config == OPTIONS
    assert energy(back, x, None, types) == energy(model, x, None, types)
    assert main(["info", str(tmp_path / f"m{suffix}")]) == 0
    out = capsys.readouterr().out
    assert "exclude_types [[0, 1]]  pair_exclude_types [[1, 1]] (model)  env_protection 0.01  set_davg_zero True" \
        in out and "activation silut:2.5" in out


def test_deep_pot_chunks_and_descriptors_with_options():
    """DeepPot's chunks of a big frame (the pairs' shares summed on the atoms they touch) and eval_descriptor
    see the options as the whole frame does."""
    coords, cells, types, sel = frames()
    model = random_model(dataclasses.replace(OPTIONS, rcut=RCUT, sel=tuple(sel)), 8)
    whole = DeepPot(model, batch_size=10_000, workers=1, progress=False).eval(coords, cells, types, atomic=True)
    parts = DeepPot(model, batch_size=3, workers=2, progress=False).eval(coords, cells, types, atomic=True)
    for a, b in zip(parts, whole):
        assert rel_err(a, b, FLOOR) <= 1e-12
    nl = build_neighbor_list(coords, cells, types, RCUT, sel)
    D, _ = compute_descriptor(nl.rij, nl.nlist, types, model.descriptor, "reference")
    got = DeepPot(model, batch_size=3, workers=2, progress=False).eval_descriptor(coords, cells, types)
    assert rel_err(got, D) <= 1e-13


def _options_dict() -> dict:
    """The dict of a model with every option, as a .json file holds it."""
    return json.loads(json.dumps(_encode_arrays({"model": model_to_dict(random_model(OPTIONS, 8))})))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["descriptor"].update(exclude_types=[[0, 1, 1]]), "model.descriptor.exclude_types[0]: [0, 1, 1] is "
                                                                  "not a pair of types [ti, tj]"),
    (lambda m: m["descriptor"].update(exclude_types=[[0, 2]]), "model.descriptor.exclude_types[0]: type 2 is not a "
                                                               "type of model.type_map (0..1)"),
    (lambda m: m["descriptor"].update(exclude_types=[["O", "H"]]), "model.descriptor.exclude_types[0]: expected an "
                                                                   "integer, got str 'O'"),
    (lambda m: m["descriptor"].update(exclude_types=3), "model.descriptor.exclude_types: expected a list of pairs"),
    (lambda m: m["descriptor"].update(env_protection="1e-2"), "model.descriptor.env_protection: expected a number"),
    (lambda m: m["descriptor"].update(env_protection=-1e-2), "model.descriptor: se_e2_a env_protection: -0.01 is below 0.0"),
    (lambda m: m["descriptor"].update(set_davg_zero="yes"), "model.descriptor.set_davg_zero: expected true or false"),
    (lambda m: m.update(pair_exclude_types=[[1, -1]]), "model.pair_exclude_types[0]: -1 is below 0"),
    (lambda m: m["descriptor"].update(activation_function="swish"), "model.descriptor.activation_function: unknown "
                                                                    "activation 'swish'"),
])
def test_bad_options_are_refused_naming_the_key(edit, message, tmp_path, capsys):
    data = _options_dict()
    edit(data["model"])
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises((ValueError, TypeError)) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert main(["info", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


# ---------------------------------------------------------------------------
# Against deepmd-kit's dpmodel backend
# ---------------------------------------------------------------------------

RCUT = 3.5


def frames(seed: int = 11):
    """Two frames of 10 atoms (types 0/1): periodic in a 5.5 A cube, and the same atoms in open space;
    atoms at least 0.9 A apart, sel with 2 spare slots of each type."""
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * 5.5
    pts = []
    while len(pts) < 10:
        x = rng.random(3) @ cell
        d = np.array(pts) - x if pts else np.zeros((0, 3))
        d -= np.round(d / 5.5) * 5.5
        if not len(pts) or np.linalg.norm(d, axis=1).min() > 0.9:
            pts.append(x)
    coords, types = np.array(pts)[None], np.array([0, 1, 1, 0, 1, 1, 0, 1, 1, 1])
    cfg = SeAConfig(RCUT, 1.0, (1, 1), (4,), 1, True)
    sel = [max(a, b) + 2 for a, b in zip(needed_sel(coords, cell[None], types, cfg),
                                           needed_sel(coords, None, types, cfg))]
    return coords, cell[None], types, sel


def deepmd_model(descriptor: dict, model: dict, activation: str = "tanh", seed: int = 1) -> dict:
    """deepmd-kit's serialized dict of a random dpmodel energy model with the given options, davg/dstd
    (zero davg with set_davg_zero, as its statistics leave it) and biases far from 0, 1."""
    from deepmd.dpmodel.model.model import get_model

    sel = frames()[3]
    config = {"type_map": ["O", "H"],
              "descriptor": {"type": "se_e2_a", "sel": sel, "rcut": RCUT, "rcut_smth": 1.0, "neuron": [4, 8],
                             "axis_neuron": 3, "type_one_side": True, "precision": "float64", "seed": seed,
                             "activation_function": activation, **descriptor},
              "fitting_net": {"type": "ener", "neuron": [8, 8], "precision": "float64", "seed": seed + 1,
                              "activation_function": activation},
              **model}
    d = get_model(copy.deepcopy(config)).serialize()
    rng = np.random.default_rng(seed)
    v = d["descriptor"]["@variables"]
    section = np.repeat([0, 1], sel)
    v["davg"] = rng.uniform(-0.1, 0.3, (2, 2, 4))[:, section] * (not descriptor.get("set_davg_zero"))
    v["dstd"] = rng.uniform(0.5, 2.0, (2, 2, 4))[:, section]
    d["fitting"]["@variables"]["bias_atom_e"] = rng.normal(0.0, 1.0, (2, 1))
    d["@variables"]["out_bias"] = rng.normal(0.0, 1.0, (1, 2, 1))
    return {"model": d, "model_def_script": config}


def deepmd_energies(data: dict, compress_rmin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Energies (2,) and atomic energies (2, natoms) of frames() by deepmd-kit's dpmodel model
    (compressed on the grid of compress_rmin if given)."""
    from deepmd.dpmodel.model.model import BaseModel

    model = BaseModel.deserialize(copy.deepcopy(data["model"]))
    if compress_rmin is not None:
        model.atomic_model.descriptor.enable_compression(compress_rmin)
    coords, cells, types, _ = frames()
    outs = [model.call(coords.reshape(1, -1), types[None], None if c is None else c.reshape(1, 9))
            for c in (cells, None)]
    return np.array([o["energy"][0, 0] for o in outs]), np.array([o["atom_energy"][0, :, 0] for o in outs])


def minidp_energies(model, backend: str = "numba") -> tuple[np.ndarray, np.ndarray]:
    coords, cells, types, _ = frames()
    ps = [predict(model, coords, c, types, backend)[0] for c in (cells, None)]
    return np.array([p.energy[0] for p in ps]), np.array([p.atom_energy[0] for p in ps])


def close(mine: np.ndarray, theirs: np.ndarray) -> float:
    """Largest difference, relative to the largest value."""
    return float(np.abs(mine - theirs).max() / np.abs(theirs).max())


CASES = [
    ({"exclude_types": [[0, 1]]}, {}, "tanh"),
    ({"exclude_types": [[0, 1]], "type_one_side": False}, {}, "tanh"),
    ({"exclude_types": [[0, 0], [1, 1]], "type_one_side": False}, {}, "tanh"),
    ({"exclude_types": [[1, 1], [1, 0]]}, {}, "tanh"),
    ({}, {"pair_exclude_types": [[0, 1]]}, "tanh"),
    ({"type_one_side": False}, {"pair_exclude_types": [[1, 1]]}, "tanh"),
    ({"env_protection": 1e-2}, {}, "tanh"),
    ({"env_protection": 1e-8}, {}, "tanh"),
    ({"set_davg_zero": True}, {}, "tanh"),
] + [({}, {}, name) for name in NAMES]


@pytest.mark.parametrize("descriptor, model, activation", CASES)
def test_energies_equal_deepmd_dpmodel(descriptor, model, activation, tmp_path):
    """Energies and atomic energies to 1e-10 of the largest, the file read as minidp reads it (.json);
    forces and virial the derivatives of that energy."""
    pytest.importorskip("deepmd")
    data = deepmd_model(descriptor, model, activation)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_encode_arrays(data)))
    mine = load_model(path)
    e, ae = deepmd_energies(data)
    for backend in ("reference", "numba"):
        me, mae = minidp_energies(mine, backend)
        assert close(me, e) <= 1e-10 and close(mae, ae) <= 1e-10, (me - e, backend)
    coords, cells, types, _ = frames()
    p, _ = predict(mine, coords, cells, types)
    d = np.random.default_rng(3).normal(size=coords.shape)
    slope = (energy(mine, coords + H * d, cells, types) - energy(mine, coords - H * d, cells, types)) / (2 * H)
    assert abs(slope + np.sum(p.force * d)) <= TOL * np.abs(p.force).sum()
    eps = np.random.default_rng(4).normal(size=(3, 3))
    slope = (energy(mine, strained(coords, H * eps), strained(cells, H * eps), types)
             - energy(mine, strained(coords, -H * eps), strained(cells, -H * eps), types)) / (2 * H)
    assert abs(slope + np.sum(p.virial[0] * eps.reshape(-1))) <= TOL * np.abs(p.virial).sum() * 3


# what deepmd-kit 3.2 compresses (its tabulation knows no silut)
COMPRESSIBLE = [c for c in CASES if c[2] in ("tanh", "gelu", "gelu_tf", "relu", "relu6", "softplus", "sigmoid",
                                             "silu", "linear", "none")]


@pytest.mark.parametrize("descriptor, model, activation", COMPRESSIBLE)
def test_compressed_equals_deepmd_compressed(descriptor, model, activation):
    """minidp's tables of the model are deepmd-kit's (dpmodel enable_compression) to round-off, bit for bit
    with tanh; both compressed models give the same energies; minidp reads deepmd-kit's compressed model."""
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.model.model import BaseModel

    data, rmin = deepmd_model(descriptor, model, activation), 0.85
    mine = model_from_dict(data)
    cm = dataclasses.replace(mine, descriptor=compress_descriptor(mine.descriptor, rmin))
    theirs = BaseModel.deserialize(copy.deepcopy(data["model"]))
    theirs.atomic_model.descriptor.enable_compression(rmin)
    for table, cd, ci in zip(cm.descriptor.compress.tables, theirs.atomic_model.descriptor.compress_data,
                             theirs.atomic_model.descriptor.compress_info, strict=True):
        assert np.array_equal(table.info, ci)
        if activation == "tanh":
            np.testing.assert_array_equal(table.data, cd)
            continue
        # other activations' derivatives are rounded differently; a_3..a_5 magnify an ulp of a node's
        # derivative (minidp.compress.hermite_coefficients): compare what the pieces give, G and dG/ds
        s = np.linspace(table.lower - 1, table.table_max + 1, 2001)
        for mine, theirs_ in zip(table_features(table, s), table_features(Table.from_deepmd(cd, ci), s)):
            assert np.abs(mine - theirs_).max() <= 1e-12 * np.abs(theirs_).max()
    e, ae = deepmd_energies(data, rmin)
    me, mae = minidp_energies(cm)
    assert close(me, e) <= 1e-10 and close(mae, ae) <= 1e-10
    back = model_from_dict({"model": theirs.serialize()})
    assert close(minidp_energies(back)[0], e) <= 1e-10


def test_deepmd_tables_skipped_for_excluded_pairs_read_as_zero():
    """deepmd-kit's tabulation skips an excluded pair's net only when exclude_types are tuples (from a file
    they are lists, and it builds every table, as minidp does); its compressed path then skips the block,
    padded slots and all. minidp reads such an empty table as the zero table and agrees."""
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.model.model import BaseModel

    data = deepmd_model({"exclude_types": [[0, 1]], "type_one_side": False}, {})
    theirs = BaseModel.deserialize(copy.deepcopy(data["model"]))
    desc = theirs.atomic_model.descriptor
    desc.reinit_exclude([(0, 1), (1, 0)])
    desc.enable_compression(0.85)
    assert [np.size(t) == 0 for t in desc.compress_data] == [False, True, True, False]
    serial = theirs.serialize()
    mine = model_from_dict({"model": serial})
    coords, cells, types, _ = frames()
    got = [predict(mine, coords, c, types)[0].energy[0] for c in (cells, None)]
    want = [theirs.call(coords.reshape(1, -1), types[None], None if c is None else c.reshape(1, 9))["energy"][0, 0]
            for c in (cells, None)]
    assert close(np.array(got), np.array(want)) <= 1e-10
    serial["descriptor"]["exclude_types"] = []
    with pytest.raises(ValueError, match="table 1 is empty but its pair of types is not in exclude_types"):
        model_from_dict({"model": serial})


@settings(max_examples=8, deadline=None)
@given(tos=st.booleans(), excl=st.lists(st.sampled_from([[0, 0], [0, 1], [1, 1]]), max_size=2, unique_by=tuple),
       pair=st.lists(st.sampled_from([[0, 0], [0, 1], [1, 1]]), max_size=1), p=st.sampled_from(PROTECTIONS),
       zero=st.booleans(), act=st.sampled_from(NAMES), seed=st.integers(0, 100))
def test_option_combinations_equal_deepmd_dpmodel(tos, excl, pair, p, zero, act, seed):
    pytest.importorskip("deepmd")
    data = deepmd_model({"type_one_side": tos, "exclude_types": excl, "env_protection": p, "set_davg_zero": zero},
                        {"pair_exclude_types": pair}, act, seed)
    e, ae = deepmd_energies(data)
    me, mae = minidp_energies(model_from_dict(data))
    assert close(me, e) <= 1e-10 and close(mae, ae) <= 1e-10


@pytest.mark.slow
def test_tf_and_dpmodel_differ_by_the_empty_slots_of_excluded_sections(tmp_path):
    """Which backend is right with exclude_types and type_one_side: deepmd-kit's TF graph masks the whole
    (centre type, neighbour type) section, empty slots included; dpmodel masks the real neighbours only, so
    its empty slots keep feeding -davg/dstd through the net, and the energy depends on how many excluded
    neighbours sit inside rcut (it steps when one crosses rcut: test_an_excluded_neighbour_moves_nothing_but
    _counts). minidp follows dpmodel; with those sections' davg set to zero (their empty rows then zero,
    as TF's) it gives TF's energy and forces to round-off. Without type_one_side both skip the section."""
    pytest.importorskip("deepmd")
    from deepmd.dpmodel.utils.serialization import save_dp_model

    for tos in (True, False):
        data = deepmd_model({"exclude_types": [[0, 1]], "type_one_side": tos}, {})
        save_dp_model(str(tmp_path / "m.dp"), data)
        run = subprocess.run([str(Path(sys.executable).parent / "dp"), "convert-backend",
                              str(tmp_path / "m.dp"), str(tmp_path / f"m{tos}.pb")], capture_output=True, text=True)
        if run.returncode:
            pytest.skip(f"dp convert-backend failed: {run.stderr[-300:]}")
        from deepmd.infer import DeepPot as TFDeepPot

        coords, cells, types, _ = frames()
        e_tf, f_tf, v_tf = TFDeepPot(str(tmp_path / f"m{tos}.pb")).eval(coords.reshape(1, -1), cells.reshape(1, 9),
                                                                          types)
        mine = model_from_dict(data)
        e_dp = deepmd_energies(data)[0][0]
        p = predict(mine, coords, cells, types)[0]
        assert abs(p.energy[0] - e_dp) <= 1e-10 * abs(e_dp)
        cfg = mine.descriptor.config
        davg = mine.descriptor.davg.copy()
        davg[0, cfg.slots(1)] = davg[1, cfg.slots(0)] = 0.0
        tf_like = dataclasses.replace(mine, descriptor=dataclasses.replace(mine.descriptor, davg=davg))
        q = predict(tf_like, coords, cells, types)[0]
        assert abs(q.energy[0] - e_tf[0, 0]) <= 1e-10 * abs(e_tf[0, 0])
        assert rel_err(q.force, f_tf.reshape(q.force.shape)) <= 1e-10
        assert rel_err(q.virial, v_tf.reshape(q.virial.shape)) <= 1e-10
        if tos:
            assert abs(p.energy[0] - e_tf[0, 0]) > 1e-6  # the two backends differ
        else:
            assert abs(p.energy[0] - e_tf[0, 0]) <= 1e-10 * abs(e_tf[0, 0])
