"""Every term of deepmd-kit's ener loss (relative_f, atom_pref, atomic energy, atom_ener_coeff, with
energy, force and virial): exact weight gradients against finite differences, values against
deepmd-kit's dpmodel EnergyLoss on the same predictions and labels.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.model import energy_forces
from minidp.neighbor import build_neighbor_list
from minidp.se_e2_a import SeAConfig
from minidp.stats import energy_bias, env_stats, param_stats, param_sums, raw_env_sums, type_counts
from minidp.training.lcurve import lcurve_columns, lcurve_line
from minidp.training.loss import Batch, LossConfig, LossValue, ener_loss, loss_and_grad, prefactors, shown_terms
from minidp.training.checkpoint import data_fingerprint
from minidp.training.sampling import System, load_systems, make_batch
from tests.test_loss import _batch, assert_directional_gradient, assert_entrywise_gradient
from tests.test_model import specs
from tests.test_model_options import EVERYTHING, MASKED, Options, frames, minidp_model, options, params
from tests.test_train import SMALL, _water_frames

# each case: the loss settings that switch a term (or an option) on, over the plain energy/force/virial
CASES = {
    "relative_f": dict(relative_f=0.5),
    "atom_pref": dict(start_pref_pf=2.0, limit_pref_pf=0.5),
    "atom_ener": dict(start_pref_ae=0.8, limit_pref_ae=0.1),
    "atom_ener_coeff": dict(enable_atom_ener_coeff=True),
    "intensive": dict(intensive_ener_virial=True),
    "huber": dict(use_huber=True, huber_delta=0.3, start_pref_ae=0.6, limit_pref_ae=0.3),
    "mae": dict(loss_func="mae", relative_f=0.4, start_pref_ae=0.6, limit_pref_ae=0.3, start_pref_pf=1.0,
                limit_pref_pf=0.2, enable_atom_ener_coeff=True),
    "mae_norm": dict(loss_func="mae", f_use_norm=True, start_pref_pf=1.0, limit_pref_pf=0.2),
    "gf": dict(start_pref_gf=0.7, limit_pref_gf=0.2, numb_generalized_coord=2, relative_f=0.5),
    "mae_gf": dict(loss_func="mae", start_pref_gf=0.7, limit_pref_gf=0.2, numb_generalized_coord=2),
    "huber_norm": dict(use_huber=True, huber_delta=[0.2, 0.5, 0.1], f_use_norm=True, enable_atom_ener_coeff=True),
    "all": dict(relative_f=0.3, start_pref_pf=1.5, limit_pref_pf=0.2, start_pref_ae=0.6, limit_pref_ae=0.3,
                enable_atom_ener_coeff=True),
}
NGC = 2  # generalized coordinates of the drdq labels
BASE = dict(start_pref_e=0.7, limit_pref_e=0.2, start_pref_f=3.0, limit_pref_f=1.0, start_pref_v=0.4, limit_pref_v=0.1)


def _labelled(spec, nframes: int):
    """A model and a batch with every extra label file's values (positive weights, coefficients of both signs)."""
    model, batch = _batch(spec, nframes, True)
    rng = np.random.default_rng(spec.seed + 7)
    shape = batch.force.shape[:2]
    return model, batch._replace(atom_ener=rng.normal(0, 1, shape), atom_pref=rng.uniform(0.1, 2.0, shape),
                                 atom_ener_coeff=rng.choice([-1.0, 1.0, 0.5], shape),
                                 drdq=rng.normal(0, 1, (shape[0], shape[1] * 3 * NGC)))


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=8, deadline=None)
@given(spec=specs(max_atoms=7), nframes=st.integers(1, 2))
def test_each_term_weight_gradient_matches_finite_differences(case, spec, nframes):
    """dL/dtheta . d against a five-point difference of L along a random direction d over every weight."""
    model, batch = _labelled(spec, nframes)
    pref = prefactors(LossConfig(**BASE, **CASES[case]), 3e-4, 1e-3)
    assert_directional_gradient(model, batch, pref, spec.seed)


@settings(max_examples=3, deadline=None)
@given(specs(max_atoms=6))
def test_each_term_weight_gradient_entry_by_entry(spec):
    """A few entries of every weight array, each against its own central difference (all terms on)."""
    model, batch = _labelled(spec, 2)
    pref = prefactors(LossConfig(**BASE, **CASES["all"]), 5e-4, 1e-3)
    assert_entrywise_gradient(model, batch, pref, entries=3)


@settings(max_examples=3, deadline=None)
@given(specs(max_atoms=6))
def test_a_term_without_its_labels_is_left_out(spec):
    """deepmd-kit's find_* = 0: no atom_pref.npy / atom_ener.npy, no term and a nan RMSE."""
    model, batch = _labelled(spec, 1)
    plain = prefactors(LossConfig(**BASE), 1e-3, 1e-3)
    both = prefactors(LossConfig(**BASE, start_pref_ae=1.0, start_pref_pf=1.0), 1e-3, 1e-3)
    bare = batch._replace(atom_ener=None, atom_pref=None)
    a, b = loss_and_grad(model, bare, plain)[0], loss_and_grad(model, bare, both)[0]
    assert a.loss == b.loss and math.isnan(b.rmse_ae) and math.isnan(b.rmse_pf)
    # use_default_pf: every atom weighs 1, the pf term is the force term again
    default = prefactors(LossConfig(**BASE, start_pref_pf=1.0, limit_pref_pf=1.0, use_default_pf=True), 1e-3, 1e-3)
    c = loss_and_grad(model, bare, default)[0]
    assert c.rmse_pf == pytest.approx(c.rmse_f, rel=1e-14) and c.loss == pytest.approx(a.loss + c.rmse_f**2, rel=1e-12)


def test_relative_f_must_be_positive_and_huber_goes_alone():
    with pytest.raises(ValueError, match="loss relative_f: 0.0 is not positive"):
        LossConfig(relative_f=0.0)
    with pytest.raises(ValueError, match="loss use_huber: true cannot go with start_pref_pf/limit_pref_pf, start_pref_gf or relative_f"):
        LossConfig(use_huber=True, relative_f=1.0)
    with pytest.raises(ValueError, match="loss f_use_norm: true needs use_huber: true"):
        LossConfig(f_use_norm=True)
    with pytest.raises(ValueError, match=r"loss huber_delta \[0.1, 0.2\]: expected one number or three"):
        LossConfig(use_huber=True, huber_delta=[0.1, 0.2])
    assert LossConfig(huber_delta=0.5).huber_delta == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="loss enable_atom_ener_coeff: expected true or false"):
        LossConfig(enable_atom_ener_coeff="yes")


def test_shown_terms_and_label_files():
    cfg = LossConfig(start_pref_ae=1.0, limit_pref_pf=1.0, enable_atom_ener_coeff=True)
    assert shown_terms(cfg) == ("ae", "pf")
    assert cfg.label_files() == {"atom_ener": 1, "atom_pref": 1, "atom_ener_coeff": 1}
    assert LossConfig().label_files() == {} and shown_terms(LossConfig()) == ()
    gf = LossConfig(start_pref_gf=1.0, numb_generalized_coord=2, loss_func="mae")
    assert gf.label_files() == {"drdq": 6} and shown_terms(gf) == ("gf", "mae")
    assert lcurve_columns(False, False, shown_terms(gf)) == ["step", "rmse_trn", "mae_e_trn", "mae_f_trn", "rmse_gf_trn",
                                                             "lr"]
    with pytest.raises(ValueError, match="loss numb_generalized_coord 0: expected an integer >= 1 with start_pref_gf"):
        LossConfig(limit_pref_gf=1.0)


# ---------------------------------------------------------------------------
# deepmd-kit's dpmodel loss on the same predictions and labels
# ---------------------------------------------------------------------------


def _deepmd_loss(config: LossConfig, start_lr: float):
    ener = pytest.importorskip("deepmd.dpmodel.loss.ener")  # optional: deepmd-kit is only a cross-check
    keys = {k: getattr(config, k) for k in config.__dataclass_fields__}
    keys["huber_delta"] = list(config.huber_delta)  # deepmd-kit takes a number or a list
    return ener.EnergyLoss(starter_learning_rate=start_lr, **keys)


@pytest.mark.parametrize("case", sorted(CASES) + ["plain"])
@pytest.mark.parametrize("mask", [False, True])
@settings(max_examples=3, deadline=None)
@given(spec=specs(max_atoms=8))
def test_every_term_equals_deepmd_kits_dpmodel_loss(case, mask, spec):
    """Loss, rmse and every RMSE column at three learning rates (the prefactor schedule) to 1e-10."""
    model, batch = _labelled(spec, 3)
    config = LossConfig(**BASE, **CASES.get(case, {}))
    start_lr = 1e-3
    dp_loss = _deepmd_loss(config, start_lr)
    p = energy_forces(batch.rij, batch.nlist, batch.atom_types, model)
    nf, natoms = batch.force.shape[:2]
    model_dict = {"energy": p.energy[:, None], "force": p.force, "virial": p.virial,
                  "atom_energy": p.atom_energy[..., None]}
    if mask:  # what a dpmodel model returns: every atom real and included
        model_dict["mask"] = np.ones((nf, natoms), dtype=np.int32)
    label_dict = {"energy": batch.energy[:, None], "force": batch.force, "virial": batch.virial,
                  "atom_ener": batch.atom_ener, "atom_pref": np.repeat(batch.atom_pref, 3, axis=1),
                  "atom_ener_coeff": batch.atom_ener_coeff, "find_energy": 1.0, "find_force": 1.0,
                  "find_virial": 1.0, "find_atom_ener": 1.0, "find_atom_pref": 1.0, "drdq": batch.drdq,
                  "find_drdq": 1.0}
    for lr in (start_lr, 3.7e-4, 1e-8):
        ours = loss_and_grad(model, batch, prefactors(config, lr, start_lr))[0]
        loss, more = dp_loss.call(lr, natoms, model_dict, label_dict)
        assert abs(ours.loss - float(loss)) <= 1e-10 * max(1.0, abs(float(loss)))
        for name, theirs in more.items():
            assert abs(getattr(ours, name) - float(theirs)) <= 1e-10 * max(1.0, abs(float(theirs))), name
        for name in ("rmse_ae", "rmse_pf") if config.loss_func == "mse" else ():
            if name not in more:
                assert math.isnan(getattr(ours, name)) or not config.has(name[5:]), name


# ---------------------------------------------------------------------------
# the label files, read per system and set like energy and force
# ---------------------------------------------------------------------------


def _two_set_system(path, rng, virial: bool):
    """A labelled deepmd/npy water system at path: 5 frames of 2 molecules in sets of 3 and 2 (random labels,
    virials if asked); returns (nframes, atom types)."""
    dpdata = pytest.importorskip("dpdata")
    nframes, nmol = 5, 2
    types = np.array([0] * nmol + [1] * 2 * nmol)
    coords = _water_frames(rng, nframes, nmol)
    data = {"atom_names": ["O", "H"], "atom_numbs": [nmol, 2 * nmol], "atom_types": types, "orig": np.zeros(3),
            "cells": np.tile(np.eye(3) * 6.0, (nframes, 1, 1)), "coords": coords, "energies": rng.normal(size=nframes),
            "forces": rng.normal(size=coords.shape)}
    if virial:
        data["virials"] = rng.normal(size=(nframes, 3, 3))
    dpdata.LabeledSystem(data=data).to("deepmd/npy", str(path), set_size=3)
    return nframes, types


def test_extra_label_files_are_read_per_set_and_reach_the_batch(tmp_path):
    """set.*/atom_ener.npy, atom_pref.npy, atom_ener_coeff.npy in frame order; a missing one is named."""
    rng = np.random.default_rng(3)
    nframes, types = _two_set_system(tmp_path / "sys", rng, virial=True)
    labels = {name: rng.normal(size=(nframes, types.size)) for name in ("atom_ener", "atom_pref", "atom_ener_coeff")}
    for name, values in labels.items():
        np.save(tmp_path / "sys/set.000" / f"{name}.npy", values[:3])
        np.save(tmp_path / "sys/set.001" / f"{name}.npy", values[3:].reshape(2, -1, 1))  # any shape of that size
    (system,) = load_systems([tmp_path / "sys"], ["O", "H"], tuple(labels))
    batch = make_batch(system, np.array([4, 1]), SMALL)
    for name, values in labels.items():
        np.testing.assert_array_equal(getattr(batch, name), values[[4, 1]])
    assert load_systems([tmp_path / "sys"], ["O", "H"])[0].atom_pref is None
    drdq = rng.normal(size=(nframes, types.size * 3 * 2))  # two generalized coordinates
    np.save(tmp_path / "sys/set.000/drdq.npy", drdq[:3])
    np.save(tmp_path / "sys/set.001/drdq.npy", drdq[3:])
    (system,) = load_systems([tmp_path / "sys"], ["O", "H"], LossConfig(start_pref_gf=1.0, numb_generalized_coord=2)
                             .label_files())
    np.testing.assert_array_equal(make_batch(system, np.array([4, 1]), SMALL).drdq, drdq[[4, 1]])
    for set_name in ("set.000", "set.001"):
        (tmp_path / "sys" / set_name / "atom_pref.npy").unlink()
    with pytest.raises(ValueError, match=r"sys/set.000/atom_pref.npy is missing; the loss's start_pref_pf/limit_pref_pf "
                                         "needs it in every set"):
        load_systems([tmp_path / "sys"], ["O", "H"], ("atom_pref",))


def test_lcurve_shows_the_extra_terms_as_deepmd_kit_names_them():
    assert lcurve_columns(False, True, ("ae", "pf")) == ["step", "rmse_trn", "rmse_e_trn", "rmse_ae_trn", "rmse_f_trn",
                                                         "rmse_v_trn", "rmse_pf_trn", "lr"]
    assert lcurve_columns(True, False) == ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn", "rmse_f_val",
                                           "rmse_f_trn", "lr"]
    line = lcurve_line(3, {"trn": LossValue(1.0, 1.0, 0.1, 0.2, 0.3, 0.4, 0.5)}, 1e-3, True, ("ae", "pf"))
    assert [float(x) for x in line.split()[1:-1]] == [1.0, 0.1, 0.4, 0.2, 0.3, 0.5]
    mae = shown_terms(LossConfig(loss_func="mae"))
    assert lcurve_columns(False, False, mae) == ["step", "rmse_trn", "mae_e_trn", "mae_f_trn", "lr"]
    line = lcurve_line(3, {"trn": LossValue(1.0, 1.0, 0.1, 0.2, 0.3, mae_e=0.6, mae_f=0.7)}, 1e-3, False, mae)
    assert [float(x) for x in line.split()[1:-1]] == [1.0, 0.6, 0.7]


# ---------------------------------------------------------------------------
# model options: the weight gradient of a model with each option
# ---------------------------------------------------------------------------

DESCRIPTOR_OPTIONS = {"none": {}, "exclude_types": dict(exclude_types=((0, 1),)),
                      "pair_exclude_types": dict(pair_exclude_types=((1, 1),)), "env_protection": dict(env_protection=0.3),
                      "all": dict(exclude_types=((0, 0),), pair_exclude_types=((0, 1),), env_protection=0.2)}


def _option_batch(opts, descriptor: dict, seed: int, nf: int = 2):
    """A model with these fitting (tests.test_model_options.Options) and descriptor options, and a
    labelled batch of nf frames with every label file and the model's fparam/aparam."""
    model = minidp_model(opts, seed)
    model.descriptor.config = dataclasses.replace(model.descriptor.config, **descriptor)
    coords, cells, types = frames(seed, nf, 7)
    cfg = model.descriptor.config
    nl = build_neighbor_list(coords, cells, types, cfg.rcut, list(cfg.sel))
    rng = np.random.default_rng(seed + 3)
    shape = coords.shape[:2]
    fparam, aparam = params(opts, nf, 7, seed)
    return model, Batch(nl.rij, nl.nlist, types, rng.normal(size=nf), rng.normal(size=coords.shape),
                        rng.normal(size=(nf, 9)), rng.normal(size=shape), rng.uniform(0.1, 2.0, shape),
                        rng.choice([-1.0, 1.0, 0.5], shape), fparam, aparam)


def _fd_check(model, batch, pref):
    assert_directional_gradient(model, batch, pref, 5)


@pytest.mark.parametrize("descriptor", sorted(DESCRIPTOR_OPTIONS))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), loss=st.sampled_from(["plain", "all"]))
def test_descriptor_options_weight_gradient_matches_finite_differences(descriptor, seed, loss):

    model, batch = _option_batch(Options(), DESCRIPTOR_OPTIONS[descriptor], seed)
    _fd_check(model, batch, prefactors(LossConfig(**BASE, **CASES.get(loss, {})), 4e-4, 1e-3))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), loss=st.sampled_from(["plain", "all"]), data=st.data())
def test_fitting_options_weight_gradient_matches_finite_differences(seed, loss, data):
    """fparam, aparam (also as a mask), dim_case_embd, atom_ener, atom_exclude_types, both embedding layouts."""

    opts = data.draw(st.sampled_from([EVERYTHING, MASKED]) | options())
    model, batch = _option_batch(opts, {}, seed)
    _fd_check(model, batch, prefactors(LossConfig(**BASE, **CASES.get(loss, {})), 4e-4, 1e-3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_atom_exclude_types_mask_equals_deepmd_kits(case):
    """With atom_exclude_types, dpmodel's mask: energy and virial over the included count, the per-atom
    terms over the included atoms only."""
    rng = np.random.default_rng(4)
    nf, N = 3, 6
    config = LossConfig(**BASE, **CASES[case])
    dp_loss = _deepmd_loss(config, 1e-3)
    included = np.array([True, False, True, True, False, True])
    pred = dict(energy=rng.normal(size=nf), force=rng.normal(size=(nf, N, 3)), virial=rng.normal(size=(nf, 9)),
                atom_energy=rng.normal(size=(nf, N)) * included)
    batch = Batch(None, None, np.zeros(N, int), rng.normal(size=nf), rng.normal(size=(nf, N, 3)),
                  rng.normal(size=(nf, 9)), rng.normal(size=(nf, N)), rng.uniform(0.1, 2, (nf, N)),
                  rng.normal(size=(nf, N)), drdq=rng.normal(size=(nf, N * 3 * NGC)))
    model_dict = {"energy": pred["energy"][:, None], "force": pred["force"], "virial": pred["virial"],
                  "atom_energy": pred["atom_energy"][..., None], "mask": np.tile(included, (nf, 1)).astype(np.int32)}
    label_dict = {"energy": batch.energy[:, None], "force": batch.force, "virial": batch.virial,
                  "atom_ener": batch.atom_ener, "atom_pref": np.repeat(batch.atom_pref, 3, axis=1),
                  "atom_ener_coeff": batch.atom_ener_coeff, "find_energy": 1.0, "find_force": 1.0,
                  "find_virial": 1.0, "find_atom_ener": 1.0, "find_atom_pref": 1.0, "drdq": batch.drdq,
                  "find_drdq": 1.0}
    for lr in (1e-3, 2e-4):
        ours = ener_loss(pred["energy"], pred["force"], pred["virial"], batch, prefactors(config, lr, 1e-3),
                         pred["atom_energy"], included)[0]
        loss, more = dp_loss.call(lr, N, model_dict, label_dict)
        assert abs(ours.loss - float(loss)) <= 1e-10 * max(1.0, abs(float(loss)))
        for name, value in more.items():
            assert abs(getattr(ours, name) - float(value)) <= 1e-10 * max(1.0, abs(float(value))), name


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("descriptor", sorted(DESCRIPTOR_OPTIONS))
@pytest.mark.parametrize("periodic", [True, False])
def test_env_stats_with_options_equal_deepmd_kits(descriptor, periodic):
    """davg/dstd with exclude_types, pair_exclude_types, env_protection: deepmd-kit's dpmodel
    DescrptSeA.compute_input_stats on the same frames (two systems), to 1e-12."""
    se_a = pytest.importorskip("deepmd.dpmodel.descriptor.se_e2_a")  # optional: the cross-check only
    cfg = dataclasses.replace(SeAConfig(3.5, 1.0, (24, 24), (4, 8), 2, True), **DESCRIPTOR_OPTIONS[descriptor])
    systems = [frames(seed, 3, 7, periodic) for seed in (1, 2)]
    sums = sum(raw_env_sums(coords, cells, types, cfg) for coords, cells, types in systems)
    davg, dstd = env_stats(sums, cfg)
    dp = se_a.DescrptSeA(cfg.rcut, cfg.rcut_smth, list(cfg.sel), list(cfg.neuron), cfg.axis_neuron,
                         exclude_types=[list(p) for p in cfg.exclude_types], env_protection=cfg.env_protection)
    merged = []
    for coords, cells, types in systems:
        sample = {"coord": coords.reshape(len(coords), -1), "atype": np.tile(types, (len(coords), 1)),
                  "box": None if cells is None else cells.reshape(len(coords), 9)}
        if cfg.pair_exclude_types:
            sample["pair_exclude_types"] = [list(p) for p in cfg.pair_exclude_types]
        merged.append(sample)
    dp.compute_input_stats(merged)
    np.testing.assert_allclose(davg, dp.davg, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dstd, dp.dstd, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: a spread below data_stat_protect, floored
def test_fparam_aparam_stats_equal_deepmd_kits(scale):
    """fparam/aparam avg and inv_std over two systems' samples: deepmd-kit's dpmodel fitting
    compute_input_stats, to 1e-12."""
    ener = pytest.importorskip("deepmd.dpmodel.fitting.ener_fitting")  # optional: the cross-check only
    rng = np.random.default_rng(9)
    nfp, nap = 2, 3
    samples = [(rng.normal(1.0, scale, (nf, nfp)), rng.normal(-0.5, scale, (nf, nloc, nap)))
               for nf, nloc in ((3, 5), (4, 2))]
    fparam_avg, fparam_inv_std = param_stats(sum(param_sums(f, nfp) for f, _ in samples), 0.01)
    aparam_avg, aparam_inv_std = param_stats(sum(param_sums(a, nap) for _, a in samples), 0.01)
    fit = ener.EnergyFittingNet(2, 8, [4], numb_fparam=nfp, numb_aparam=nap)
    fit.compute_input_stats([{"fparam": f, "find_fparam": 1.0, "aparam": a, "find_aparam": 1.0} for f, a in samples],
                            protection=0.01)
    for ours, theirs in ((fparam_avg, fit.fparam_avg), (fparam_inv_std, fit.fparam_inv_std),
                         (aparam_avg, fit.aparam_avg), (aparam_inv_std, fit.aparam_inv_std)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    assert param_stats(np.zeros((1, 3)))[0].tolist() == [0.0] and param_stats(np.zeros((1, 3)))[1].tolist() == [10.0]


def test_fparam_aparam_files_are_read_per_set_and_reach_the_batch(tmp_path):
    rng = np.random.default_rng(5)
    nframes, types = _two_set_system(tmp_path / "sys", rng, virial=False)
    fparam, aparam = rng.normal(size=(nframes, 2)), rng.normal(size=(nframes, types.size, 1))
    for set_name, rows in (("set.000", slice(0, 3)), ("set.001", slice(3, 5))):
        np.save(tmp_path / "sys" / set_name / "fparam.npy", fparam[rows])
        np.save(tmp_path / "sys" / set_name / "aparam.npy", aparam[rows].reshape(-1, types.size))
    (system,) = load_systems([tmp_path / "sys"], ["O", "H"], numb_fparam=2, numb_aparam=1)
    batch = make_batch(system, np.array([3, 0]), SMALL)
    np.testing.assert_array_equal(batch.fparam, fparam[[3, 0]])
    np.testing.assert_array_equal(batch.aparam, aparam[[3, 0]])
    with pytest.raises(ValueError, match=r"sys/set.000/fparam.npy holds 6 numbers; expected 3 frames x 3"):
        load_systems([tmp_path / "sys"], ["O", "H"], numb_fparam=3)
    (tmp_path / "sys/set.001/fparam.npy").unlink()
    (tmp_path / "sys/set.000/fparam.npy").unlink()
    (system,) = load_systems([tmp_path / "sys"], ["O", "H"], numb_fparam=2, default_fparam=[0.5, 2.0])
    assert (system.fparam == [0.5, 2.0]).all()
    with pytest.raises(ValueError, match=r"sys/set.000/fparam.npy is missing; the model's numb_fparam needs it"):
        load_systems([tmp_path / "sys"], ["O", "H"], numb_fparam=2)


def test_energy_bias_counts_leave_out_excluded_types():
    """deepmd-kit zeroes the excluded types' columns before the least squares: they get bias 0."""
    counts = np.array([type_counts(np.array(t), 2, (1,)) for t in ([0, 1, 1], [0, 0, 1, 1, 1, 1])])
    assert counts.tolist() == [[1.0, 0.0], [2.0, 0.0]]
    bias = energy_bias(np.array([-3.0, -6.0]), counts)
    assert bias == pytest.approx([-3.0, 0.0])


def test_a_restart_sees_other_extra_labels():
    """The data fingerprint of checkpoints covers the extra labels: other atom_pref, other data."""
    base = System(Path("s"), np.zeros((1, 2, 3)), None, np.array([0, 1]), np.zeros(1), np.zeros((1, 2, 3)), None)
    plain, weighted = data_fingerprint([base]), data_fingerprint([base._replace(atom_pref=np.ones((1, 2)))])
    assert plain != weighted != data_fingerprint([base._replace(atom_pref=np.full((1, 2), 2.0))])
