"""The fitting's options: frame and atomic parameters (fparam, aparam, default_fparam, use_aparam_as_mask),
the case embedding (dim_case_embd), atom_ener and the model's atom_exclude_types; and the DeepPot interface
that goes with them.

Three kinds of check:

- minidp alone, on small random models with options drawn by hypothesis: forces and virials are the
  energy's derivatives (central differences), the parameters' shapes broadcast as deepmd-kit's do, a
  model's file round-trips, bad files and calls are refused in one line;
- against deepmd-kit's backend-neutral dpmodel on models it builds and serializes itself: energies and
  atomic energies to 1e-10 of the largest, forces to the central differences of dpmodel's own energy
  (deepmd-kit 3.2's dpmodel DeepPot returns NaN forces), and against its TensorFlow backend (dp
  convert-backend) for what TensorFlow supports;
- deepmd-kit's own fixtures (source/tests/infer/fparam_aparam*.yaml, .pbtxt) when the folder holding them
  is named by the environment variable DEEPMD_INFER_DIR (not shipped: deepmd-kit's files).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minidp import DeepPot
from minidp.checks import InputError
from minidp.cli import main
from minidp.model import EnergyModel, FittingInput, fitting_last_layer
from minidp.io.model_check import check_model_dict
from minidp.nn import fitting_net, net_forward, Net
from minidp.se_e2_a import SeAConfig
from minidp.io.serialization import load_model, model_from_dict, model_to_dict, save_model
from tests.conftest import random_model, rel_err

ROOT = Path(__file__).resolve().parents[1]
TYPE_MAP = ["O", "H"]
CFG = SeAConfig(rcut=3.5, rcut_smth=1.0, sel=(24, 24), neuron=(4, 8), axis_neuron=2, type_one_side=True)
# central differences (Angstrom, or strain): truncation ~ h^2 E''' and round-off ~ 1e-16 |E| / h, both
# below 1e-8 of the forces here
H = 1e-5
TOL = 1e-6
# forces (eV/A) and virials (eV) whose norm is below this are compared absolutely (to TOL * FLOOR): the
# differences' round-off is ~1e-16 |E| / h, whatever the size of the force
FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class Options:
    """The fitting options of one model."""

    nfp: int = 0  # numb_fparam
    nap: int = 0  # numb_aparam
    nce: int = 0  # dim_case_embd
    mask: bool = False  # use_aparam_as_mask
    default: bool = False  # a default_fparam
    atom_ener: tuple = ()  # deepmd-kit's atom_ener list
    exclude: tuple = ()  # atom_exclude_types
    one_side: bool = True  # the descriptor's type_one_side


@st.composite
def options(draw) -> Options:
    nfp, nap = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    return Options(nfp, nap, draw(st.sampled_from([0, 2])), nap > 0 and draw(st.booleans()),
                   nfp > 0 and draw(st.booleans()),
                   draw(st.sampled_from([(), (None, None), (1.5, None), (None, -2.0), (0.5,), (1.0, 2.0)])),
                   draw(st.sampled_from([(), (0,), (1,)])), draw(st.booleans()))


# every option at least once, whatever hypothesis draws
EVERYTHING = Options(2, 1, 2, False, True, (1.0, None), (1,), False)
MASKED = Options(1, 2, 0, True, False, (0.5,), (), True)


def frames(seed: int, nf: int = 2, natoms: int = 7, periodic: bool = True):
    """coords (nf, natoms, 3) at least 1 A apart, cells (nf, 3, 3) of 6-7 A or None, types (natoms,)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(nf):
        pts = []
        while len(pts) < natoms:
            x = rng.uniform(0, 6.0, 3)
            if all(np.linalg.norm(x - p) > 1.0 for p in pts):
                pts.append(x)
        out.append(pts)
    cells = np.array([np.diag(rng.uniform(6.0, 7.0, 3)) for _ in range(nf)]) if periodic else None
    types = np.array([0, 1] * natoms)[:natoms]
    rng.shuffle(types)
    return np.array(out), cells, types


def params(opts: Options, nf: int, natoms: int, seed: int):
    """Random fparam (nf, nfp) and aparam (nf, natoms, nap), or None for a model without them."""
    rng = np.random.default_rng(seed + 7)
    return (rng.normal(size=(nf, opts.nfp)) if opts.nfp else None,
            rng.normal(size=(nf, natoms, opts.nap)) if opts.nap else None)


def minidp_model(opts: Options, seed: int) -> EnergyModel:
    """A random minidp model (conftest.random_model) with the given fitting options."""
    model = random_model(dataclasses.replace(CFG, type_one_side=opts.one_side), seed)
    rng = np.random.default_rng(seed)
    spec = FittingInput(rng.normal(size=opts.nfp), rng.uniform(0.5, 2.0, opts.nfp), rng.normal(size=opts.nap),
                        rng.uniform(0.5, 2.0, opts.nap), rng.normal(size=opts.nfp) if opts.default else None,
                        opts.mask, rng.normal(size=opts.nce))
    n_in = CFG.dim_out + spec.width
    fitting = [fitting_net(n_in, (6, 6), 1, "tanh", True, seed=seed + 10 + t) for t in range(2)]
    return dataclasses.replace(model, type_map=list(TYPE_MAP), fitting=fitting, fitting_input=spec,
                               atom_ener=opts.atom_ener, atom_exclude_types=opts.exclude)


def fd_forces_virial(energy, coords, cells):
    """-dE/dx (nf, natoms, 3) and -dE/d eps (nf, 9) by central differences; energy(coords, cells) -> (nf',)
    for nf' frames at once (every displaced frame of every frame in one call)."""
    nf, natoms, _ = coords.shape
    # displacements: each coordinate, then each strain component, +h and -h
    steps = [np.eye(natoms * 3)[k].reshape(natoms, 3) for k in range(natoms * 3)]
    strains = [np.eye(9)[k].reshape(3, 3) for k in range(9)]
    xs, cs = [], []
    for f in range(nf):
        for sign in (1.0, -1.0):
            for d in steps:
                xs.append(coords[f] + sign * H * d)
                cs.append(None if cells is None else cells[f])
            for eps in strains:
                m = np.eye(3) + sign * H * eps
                xs.append(coords[f] @ m.T)
                cs.append(None if cells is None else cells[f] @ m.T)
    e = energy(np.array(xs), None if cells is None else np.array(cs)).reshape(nf, 2, natoms * 3 + 9)
    # (nf, natoms * 3 + 9)
    g = -(e[:, 0] - e[:, 1]) / (2 * H)
    return g[:, :natoms * 3].reshape(nf, natoms, 3), g[:, natoms * 3:]


def repeat_params(fparam, aparam, f: int, n: int):
    """Frame f's parameters repeated for n displaced frames."""
    return (None if fparam is None else np.repeat(fparam[f:f + 1], n, axis=0),
            None if aparam is None else np.repeat(aparam[f:f + 1], n, axis=0))


def minidp_fd(dp: DeepPot, coords, cells, types, fparam, aparam):
    """fd_forces_virial of minidp's energy, frame by frame (each frame has its own parameters)."""
    n = 2 * (coords.shape[1] * 3 + 9)
    parts = []
    for f in range(coords.shape[0]):
        fp, ap = repeat_params(fparam, aparam, f, n)
        parts.append(fd_forces_virial(lambda x, c: dp.eval(x, c, types, fparam=fp, aparam=ap)[0],
                                      coords[f:f + 1], None if cells is None else cells[f:f + 1]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------
# minidp alone: derivatives, broadcasting, the options' meaning
# ---------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(opts=options(), seed=st.integers(0, 2**16), periodic=st.booleans())
@example(opts=EVERYTHING, seed=1, periodic=True)
@example(opts=MASKED, seed=2, periodic=False)
def test_forces_and_virials_are_the_energy_derivatives(opts, seed, periodic):
    """With every option: F = -dE/dx and W = -dE/d eps (central differences), on every backend; the
    parameters do not move with the atoms, so they add nothing else to the forces."""
    model = minidp_model(opts, seed)
    coords, cells, types = frames(seed, periodic=periodic)
    fparam, aparam = params(opts, *coords.shape[:2], seed)
    for backend in ("numba", "reference"):
        dp = DeepPot(model, backend=backend, workers=1, progress=False)
        e, f, v, ae, av = dp.eval(coords, cells, types, atomic=True, fparam=fparam, aparam=aparam)
        fd_f, fd_v = minidp_fd(dp, coords, cells, types, fparam, aparam)
        assert rel_err(f, fd_f, FLOOR) <= TOL and rel_err(v, fd_v, FLOOR) <= TOL
        np.testing.assert_allclose(ae.sum(axis=1), e, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(av.sum(axis=1), v, rtol=1e-12, atol=1e-12 * np.abs(v).max())
        # excluded atoms have no energy (bias included), yet push their neighbours
        excluded = np.isin(types, opts.exclude)
        assert not ae[:, excluded].any()


@settings(max_examples=8, deadline=None)
@given(opts=options(), seed=st.integers(0, 2**16))
@example(opts=EVERYTHING, seed=3)
def test_chunks_of_a_big_frame_get_their_atoms_parameters(opts, seed):
    """A frame split over centre atoms (batch_size 2) gives what the whole frame gives: each chunk reads
    its own atoms' aparam."""
    model = minidp_model(opts, seed)
    coords, cells, types = frames(seed, nf=2, natoms=7)
    fparam, aparam = params(opts, 2, 7, seed)
    whole = DeepPot(model, workers=1, progress=False).eval(coords, cells, types, True, fparam, aparam)
    split = DeepPot(model, batch_size=2, workers=2, progress=False).eval(coords, cells, types, True, fparam, aparam)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_parameter_shapes_broadcast_as_deepmd_kits():
    """fparam: (nf, nfp), (nfp,), (1, nfp), flat; aparam: (nf, natoms, nap), (natoms, nap), (nap,), flat;
    all told apart by size, as deepmd-kit's DeepEval._standard_input."""
    opts = Options(nfp=2, nap=2)
    dp = DeepPot(minidp_model(opts, 5), workers=1, progress=False)
    coords, cells, types = frames(5, nf=3, natoms=4)
    fp, ap = np.array([0.3, -0.7]), np.array([[0.1, 0.2], [0.3, 0.4], [-0.5, 0.6], [0.7, -0.8]])
    ref = dp.eval(coords, cells, types, fparam=np.tile(fp, (3, 1)), aparam=np.tile(ap, (3, 1, 1)))
    for fparam in (fp, fp[None], fp.tolist(), np.tile(fp, 3)):
        for aparam in (ap, ap.reshape(-1), np.tile(ap.reshape(1, -1), (3, 1)), ap.tolist()):
            for a, b in zip(dp.eval(coords, cells, types, fparam=fparam, aparam=aparam), ref):
                np.testing.assert_array_equal(a, b)
    # one atom's aparam for every atom
    one = dp.eval(coords, cells, types, fparam=fp, aparam=ap[0])
    np.testing.assert_array_equal(one[0], dp.eval(coords, cells, types, fparam=fp, aparam=np.tile(ap[0], (4, 1)))[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"aparam": np.zeros(2)}, r"this model needs fparam \(2 numbers per frame, numb_fparam\) and has no "
                              r"default_fparam; pass fparam"),
    ({"fparam": np.zeros(2)}, r"this model needs aparam \(2 numbers per atom, numb_aparam\); pass aparam"),
    ({"fparam": np.zeros(3), "aparam": np.zeros(2)},
     r"fparam has shape \(3,\); this model takes 2 numbers per frame \(numb_fparam\): expected \(3, 2\) or \(2,\)"),
    ({"fparam": np.zeros(2), "aparam": np.zeros(5)},
     r"aparam has shape \(5,\); this model takes 2 numbers per atom \(numb_aparam\): expected \(3, 4, 2\), "
     r"\(4, 2\) or \(2,\)"),
    ({"fparam": [np.nan, 0.0], "aparam": np.zeros(2)}, r"fparam has a non-finite entry nan at index \(0,\)"),
])
def test_bad_parameters_are_refused_in_one_line(kwargs, message):
    dp = DeepPot(minidp_model(Options(nfp=2, nap=2), 5), workers=1, progress=False)
    coords, cells, types = frames(5, nf=3, natoms=4)
    with pytest.raises(ValueError, match=message) as err:
        dp.eval(coords, cells, types, **kwargs)
    assert "\n" not in str(err.value)


def test_default_fparam_stands_in_for_a_missing_fparam():
    opts = Options(nfp=2, nap=1, default=True)
    model = minidp_model(opts, 6)
    dp = DeepPot(model, workers=1, progress=False)
    coords, cells, types = frames(6)
    aparam = params(opts, 2, 7, 6)[1]
    assert dp.has_default_fparam() and dp.get_dim_fparam() == 2 and dp.get_dim_aparam() == 1
    assert dp.get_default_fparam() == model.fitting_input.default_fparam.tolist()
    a = dp.eval(coords, cells, types, aparam=aparam)
    b = dp.eval(coords, cells, types, fparam=model.fitting_input.default_fparam, aparam=aparam)
    c = dp.eval(coords, cells, types, fparam=[5.0, 5.0], aparam=aparam)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[0] - c[0]).max() > 1e-6


def test_use_aparam_as_mask_takes_aparam_and_ignores_it():
    """deepmd-kit: get_dim_aparam() is numb_aparam and callers pass aparam, but the nets do not read it."""
    dp = DeepPot(minidp_model(MASKED, 8), workers=1, progress=False)
    coords, cells, types = frames(8)
    assert dp.get_dim_aparam() == 2 and dp.model.fitting[0].n_in == CFG.dim_out + 1
    a = dp.eval(coords, cells, types, fparam=[0.2], aparam=np.zeros(2))
    b = dp.eval(coords, cells, types, fparam=[0.2], aparam=np.ones(2))
    c = dp.eval(coords, cells, types, fparam=[0.2])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])


@pytest.mark.parametrize("atom_ener, vacuum", [((), (False, False)), ((None, None), (False, False)),
                                               ((1.0, None), (True, False)), ((None, 2.0), (False, True)),
                                               ((0.5,), (True, True))])
def test_an_isolated_atom_of_an_atom_ener_type_has_its_bias(atom_ener, vacuum):
    """E_i = F(x_i) - F(x_i^0) + b: with davg = 0, an atom without neighbours has D = 0, so E = b exactly for
    the types that subtract (dpmodel's rule: entries not None, and types beyond a shorter list)."""
    model = minidp_model(Options(nfp=1, nap=1, nce=2, atom_ener=atom_ener), 9)
    model.descriptor.davg[...] = 0.0
    assert model.vacuum == vacuum
    dp = DeepPot(model, workers=1, progress=False)
    for t in (0, 1):
        _, _, _, ae, _ = dp.eval(np.zeros((1, 1, 3)), None, [t], atomic=True, fparam=[0.3], aparam=[0.4])
        if vacuum[t]:
            assert ae[0, 0, 0] == model.bias[t]
        else:
            assert abs(ae[0, 0, 0] - model.bias[t]) > 1e-6


def test_per_frame_types_and_padding_atoms():
    """atom_types (nf, natoms) with rows that differ (deepmd-kit's mixed_type) equal each frame evaluated
    alone; an atom of type -1 is not there (zero outputs), its aparam row unread."""
    opts = Options(nfp=1, nap=1)
    dp = DeepPot(minidp_model(opts, 10), workers=1, progress=False)
    coords, cells, _ = frames(10, nf=3, natoms=5)
    types = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, -1], [0, 1, 1, 0, 1]])
    fparam, aparam = params(opts, 3, 5, 10)
    e, f, v, ae, av = dp.eval(coords, cells, types, atomic=True, fparam=fparam, aparam=aparam, mixed_type=True)
    for k in range(3):
        real = types[k] >= 0
        one = dp.eval(coords[k:k + 1, real], cells[k:k + 1], types[k, real], atomic=True, fparam=fparam[k],
                      aparam=aparam[k, real])
        np.testing.assert_allclose(e[k], one[0][0], rtol=1e-13)
        np.testing.assert_allclose(f[k, real], one[1][0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(ae[k, real], one[3][0], rtol=1e-12, atol=1e-13)
        assert not f[k, ~real].any() and not ae[k, ~real].any()
    D = dp.eval_descriptor(coords, cells, types, fparam=fparam, aparam=aparam, mixed_type=True)
    assert D.shape == (3, 5, CFG.dim_out) and not D[1, 4].any()


def test_fitting_last_layer_is_the_last_hidden_layer():
    opts = EVERYTHING
    model = minidp_model(opts, 11)
    dp = DeepPot(model, workers=1, progress=False)
    coords, cells, types = frames(11)
    fparam, aparam = params(opts, 2, 7, 11)
    ll = dp.eval_fitting_last_layer(coords, cells, types, fparam=fparam, aparam=aparam)
    assert ll.shape == (2, 7, 6)
    # the final linear layer on it, minus the vacuum term, plus the bias, is the atomic energy (type 0 atoms)
    _, _, _, ae, _ = dp.eval(coords, cells, types, atomic=True, fparam=fparam, aparam=aparam)
    D = dp.eval_descriptor(coords, cells, types, fparam=fparam, aparam=aparam)
    zero = fitting_last_layer(np.zeros_like(D), types, model, dp.check_inputs(coords, cells, types, fparam,
                                                                              aparam).params(slice(None), slice(None)))
    last = Net(model.fitting[0].layers[-1:])
    t0 = types == 0
    y = net_forward(last, ll[:, t0].reshape(-1, 6))[0] - net_forward(last, zero[:, t0].reshape(-1, 6))[0]
    np.testing.assert_allclose(y.reshape(2, -1) + model.bias[0], ae[:, t0, 0], rtol=1e-12)


def test_getters():
    model = minidp_model(EVERYTHING, 12)
    model.model_def_script = {"type_map": TYPE_MAP, "fitting_net": {"numb_fparam": 2}}
    dp = DeepPot(model, workers=1, progress=False)
    assert (dp.get_dim_fparam(), dp.get_dim_aparam(), dp.has_default_fparam()) == (2, 1, True)
    assert dp.get_sel_type() == [0] and dp.get_ntypes() == 2 and dp.get_type_map() == TYPE_MAP
    assert dp.get_rcut() == CFG.rcut and isinstance(dp.get_rcut(), float)
    script = dp.get_model_def_script()
    assert script == model.model_def_script and script is not model.model_def_script
    assert DeepPot(minidp_model(Options(), 12)).get_sel_type() == [0, 1]


def test_zero_atoms_with_parameters():
    """deepmd-kit's test_zero_input: natoms = 0, fparam (nfp,), aparam (0, nap)."""
    dp = DeepPot(minidp_model(Options(nfp=1, nap=1), 13), workers=1, progress=False)
    for cells in (np.eye(3)[None], None):
        e, f, v, ae, av = dp.eval(np.zeros((1, 0, 3)), cells, np.zeros(0, dtype=int), atomic=True,
                                  fparam=np.zeros(1), aparam=np.zeros((0, 1)))
        assert (e.shape, f.shape, v.shape, ae.shape, av.shape) == ((1, 1), (1, 0, 3), (1, 9), (1, 0, 1), (1, 0, 9))
        assert not e.any() and not v.any()


# ---------------------------------------------------------------------------
# Files: round trips and checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".dp", ".yaml", ".json"])
def test_every_file_format_keeps_the_options(tmp_path, suffix):
    model = minidp_model(EVERYTHING, 14)
    model.model_def_script = {"type_map": TYPE_MAP}
    save_model(tmp_path / f"m{suffix}", model)
    back = load_model(tmp_path / f"m{suffix}")
    spec, spec2 = model.fitting_input, back.fitting_input
    for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std", "case_embd", "default_fparam"):
        np.testing.assert_array_equal(getattr(spec, name), getattr(spec2, name))
    assert (back.atom_ener, back.atom_exclude_types, back.model_def_script) == \
        (model.atom_ener, model.atom_exclude_types, model.model_def_script)
    coords, cells, types = frames(14)
    fparam, aparam = params(EVERYTHING, 2, 7, 14)
    for a, b in zip(DeepPot(model).eval(coords, cells, types, True, fparam, aparam),
                    DeepPot(back).eval(coords, cells, types, True, fparam, aparam)):
        np.testing.assert_array_equal(a, b)


def test_info_lists_the_options(tmp_path, capsys):
    save_model(tmp_path / "m.dp", minidp_model(EVERYTHING, 14))
    assert main(["info", str(tmp_path / "m.dp")]) == 0
    assert ("options      numb_fparam 2, numb_aparam 1, dim_case_embd 2, atom_ener [1.0, None], "
            "atom_exclude_types [1], default_fparam [") in capsys.readouterr().out
    save_model(tmp_path / "p.dp", minidp_model(Options(), 14))
    assert main(["info", str(tmp_path / "p.dp")]) == 0
    assert "options      none" in capsys.readouterr().out


def _edit(path: str, value):
    def edit(data):
        *keys, last = path.split(".")
        node = data["model"]
        for k in keys:
            node = node[k]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit("fitting.@variables.fparam_avg", None),
     r"model.fitting.@variables.fparam_avg: missing; expected 2 numbers \(numb_fparam is 2\)"),
    (_edit("fitting.@variables.aparam_inv_std", np.zeros(3)),
     r"model.fitting.@variables.aparam_inv_std: shape \(3,\), expected \(1,\)"),
    (_edit("fitting.@variables.fparam_inv_std", np.array([1.0, np.inf])),
     r"model.fitting.@variables.fparam_inv_std: inf at index \(1,\); expected finite numbers"),
    (_edit("fitting.@variables.case_embd", KeyError),
     r"model.fitting.@variables.case_embd: missing; expected 2 numbers \(dim_case_embd is 2\)"),
    (_edit("fitting.default_fparam", [1.0]), r"model.fitting.default_fparam: shape \(1,\), expected \(2,\)"),
    (_edit("fitting.numb_fparam", 3), r"model.fitting.@variables.fparam_avg: shape \(2,\), expected \(3,\)"),
    (_edit("fitting.numb_aparam", "1"), r"model.fitting.numb_aparam: expected an integer, got str '1'"),
    (_edit("fitting.use_aparam_as_mask", "no"), r"model.fitting.use_aparam_as_mask: expected true or false"),
    (_edit("fitting.dim_case_embd", 0),
     r"model.fitting.nets.networks\[0\].layers\[0\].@variables.w: shape \(21, 6\), expected \(19, 6\)"),
    (_edit("atom_exclude_types", [2]), r"model.atom_exclude_types: type 2 is not among the 2 types"),
    (_edit("fitting.atom_ener", [1.0, "x"]), r"model.fitting.atom_ener\[1\]: expected a number, got str 'x'"),
])
def test_damaged_files_are_refused_naming_the_key(edit, message):
    data = {"model": model_to_dict(minidp_model(EVERYTHING, 15))}
    check_model_dict(copy.deepcopy(data), "m.dp")  # the file as written passes
    edit(data)
    with pytest.raises(InputError, match=r"^m.dp: " + message):
        check_model_dict(data, "m.dp")


def test_default_fparam_must_agree_with_its_stored_tensor():
    data = {"model": model_to_dict(minidp_model(EVERYTHING, 15))}
    data["model"]["fitting"]["@variables"]["default_fparam_tensor"] = np.array([9.0, 9.0])
    with pytest.raises(InputError, match=r"default_fparam_tensor: \[9.0, 9.0\] differs from "
                                         r"model.fitting.default_fparam"):
        check_model_dict(data, "m.dp")


def test_training_refuses_only_the_options_it_cannot_train(monkeypatch):
    """Every fitting option trains (gradients: tests/test_loss_terms.py); one not in TRAINABLE is named."""
    from minidp.training import loss

    model = minidp_model(Options(nfp=1, exclude=(1,)), 16)
    loss.refuse_untrainable(model)
    monkeypatch.setattr(loss, "TRAINABLE", loss.TRAINABLE - {"numb_fparam", "atom_exclude_types"})
    with pytest.raises(ValueError, match=r"training a model with numb_fparam, atom_exclude_types is not supported"):
        loss.refuse_untrainable(model)


# ---------------------------------------------------------------------------
# Against deepmd-kit's dpmodel and TensorFlow backends
# ---------------------------------------------------------------------------


def deepmd_model(opts: Options, seed: int):
    """A model built by deepmd-kit's dpmodel with these options, its statistics, biases and case embedding
    made random: (dpmodel model, its serialized file dict)."""
    model_mod = pytest.importorskip("deepmd.dpmodel.model.model")
    fitting = {"neuron": [6, 6], "resnet_dt": True, "seed": seed, "numb_fparam": opts.nfp, "numb_aparam": opts.nap,
               "dim_case_embd": opts.nce, "use_aparam_as_mask": opts.mask, "atom_ener": list(opts.atom_ener)}
    if opts.default:
        fitting["default_fparam"] = list(np.random.default_rng(seed).normal(size=opts.nfp))
    script = {"type_map": TYPE_MAP, "atom_exclude_types": list(opts.exclude), "fitting_net": fitting,
              "descriptor": {"type": "se_e2_a", "sel": list(CFG.sel), "rcut": CFG.rcut, "rcut_smth": CFG.rcut_smth,
                             "neuron": list(CFG.neuron), "axis_neuron": CFG.axis_neuron,
                             "type_one_side": opts.one_side, "seed": seed}}
    # normalized as `dp train` stores it (deepmd-kit's TensorFlow reader of a .pb needs its keys)
    script = pytest.importorskip("deepmd.utils.argcheck").model_args().normalize_value(script, trim_pattern="_*")
    d = model_mod.get_model(copy.deepcopy(script)).serialize()
    rng = np.random.default_rng(seed + 1)
    dv, fv = d["descriptor"]["@variables"], d["fitting"]["@variables"]
    dv["davg"] = rng.uniform(-0.2, 0.2, dv["davg"].shape) * [1.0, 0.0, 0.0, 0.0]
    dv["dstd"] = rng.uniform(0.3, 1.0, dv["dstd"].shape)
    fv["bias_atom_e"] = rng.normal(size=fv["bias_atom_e"].shape)
    d["@variables"]["out_bias"] = rng.normal(size=d["@variables"]["out_bias"].shape)
    for name in ("fparam_avg", "aparam_avg", "case_embd"):
        if fv.get(name) is not None:
            fv[name] = rng.normal(size=fv[name].shape)
    for name in ("fparam_inv_std", "aparam_inv_std"):
        if fv.get(name) is not None:
            fv[name] = rng.uniform(0.5, 2.0, fv[name].shape)
    return model_mod.BaseModel.deserialize(copy.deepcopy(d)), {"model": d, "model_def_script": script}


def dpmodel_energy(dm, coords, cells, types, fparam, aparam):
    """dpmodel's (energy (nf,), atomic energies (nf, natoms))."""
    nf = coords.shape[0]
    out = dm.call(coords.reshape(nf, -1), np.tile(types, (nf, 1)), None if cells is None else cells.reshape(nf, 9),
                  fparam=fparam, aparam=aparam)
    return out["energy"].reshape(nf), out["atom_energy"].reshape(nf, -1)


@settings(max_examples=8, deadline=None)
@given(opts=options(), seed=st.integers(0, 2**16), periodic=st.booleans())
@example(opts=EVERYTHING, seed=21, periodic=True)
@example(opts=MASKED, seed=22, periodic=True)
@example(opts=Options(1, 1, 2, False, True, (None, -2.0), (0,), True), seed=23, periodic=False)
def test_equals_deepmd_dpmodel(opts, seed, periodic):
    """Energies and atomic energies equal dpmodel's to 1e-10 of the largest; forces and virials are the
    central differences of dpmodel's own energy (to 1e-6)."""
    dm, data = deepmd_model(opts, seed)
    check_model_dict(data, "dpmodel")
    dp = DeepPot(model_from_dict(data), workers=1, progress=False)
    coords, cells, types = frames(seed, periodic=periodic)
    fparam, aparam = params(opts, 2, 7, seed)
    fp_call = None if opts.default else fparam  # a model with a default is called without fparam
    e, f, v, ae, _ = dp.eval(coords, cells, types, atomic=True, fparam=fp_call, aparam=aparam)
    e_ref, ae_ref = dpmodel_energy(dm, coords, cells, types, fp_call, aparam)
    assert np.abs(e[:, 0] - e_ref).max() <= 1e-10 * np.abs(e_ref).max()
    assert np.abs(ae[..., 0] - ae_ref).max() <= 1e-10 * np.abs(ae_ref).max()
    for k in range(2):
        n = 2 * (7 * 3 + 9)
        fp, ap = repeat_params(fp_call, aparam, k, n)
        fd_f, fd_v = fd_forces_virial(lambda x, c: dpmodel_energy(dm, x, c, types, fp, ap)[0],
                                      coords[k:k + 1], None if cells is None else cells[k:k + 1])
        assert rel_err(f[k:k + 1], fd_f, FLOOR) <= TOL
        if periodic:
            assert rel_err(v[k:k + 1], fd_v, FLOOR) <= TOL


@pytest.mark.slow
def test_equals_deepmd_tensorflow(tmp_path):
    """fparam, aparam (one model with use_aparam_as_mask) and atom_ener through `dp convert-backend` to a
    TensorFlow graph: energies, forces, virials, atomic energies and virials to 1e-10 of the largest."""
    deepmd_infer = pytest.importorskip("deepmd.infer")
    from deepmd.dpmodel.utils.serialization import save_dp_model

    for k, opts in enumerate([Options(2, 1, atom_ener=(1.0, None), one_side=False),
                              Options(1, 2, mask=True, atom_ener=(None, 0.3))]):
        _, data = deepmd_model(opts, 30 + k)
        save_dp_model(str(tmp_path / f"m{k}.dp"), data)
        r = subprocess.run(["dp", "convert-backend", str(tmp_path / f"m{k}.dp"), str(tmp_path / f"m{k}.pb")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        coords, cells, types = frames(30 + k)
        fparam, aparam = params(opts, 2, 7, 30 + k)
        ref = deepmd_infer.DeepPot(str(tmp_path / f"m{k}.pb")).eval(coords, cells, types, atomic=True,
                                                                     fparam=fparam, aparam=aparam)
        for path in (tmp_path / f"m{k}.dp", tmp_path / f"m{k}.pb"):
            ours = DeepPot(path, workers=1, progress=False).eval(coords, cells, types, True, fparam, aparam)
            for a, b in zip(ours, ref):
                assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max()


# ---------------------------------------------------------------------------
# deepmd-kit's fixtures (source/tests/infer), when DEEPMD_INFER_DIR names the folder holding them
# ---------------------------------------------------------------------------

# fparam_aparam-testcase.yaml: the frame every infer test uses, fparam = aparam = 0.25852028, and the
# reference atomic energies and forces (deepmd-kit's TensorFlow graph fparam_aparam.pbtxt)
FIXTURE_COORD = [12.83, 2.56, 2.18, 12.09, 2.87, 2.74, 0.25, 3.32, 1.68, 3.36, 3.00, 1.81, 3.51, 2.51, 2.60,
                 4.27, 3.22, 1.56]
FIXTURE_PARAM = 0.25852028
FIXTURE_AE = [-0.10382711830399538, -0.07285433575272915, -0.09467600174099156, -0.1467050086239614,
              -0.07660561620618722, -0.0727729599850293]
FIXTURE_F = [0.06622266817497907, 0.05278739055693523, 0.02265727495541423, -0.026060478509158384,
             -0.04538811686410719, 0.010582475691470722, 0.1679392490937767, -0.0022578280226873207,
             -0.044901456703554526, -0.11483641035736859, -0.011697904666950892, 0.06140402504113953,
             -0.080787781321328, -0.0583887805624337, 0.06773639989682191, -0.012477247080900792,
             0.06494523955924385, -0.11747871888129187]


def fixture(name: str) -> Path:
    folder = os.environ.get("DEEPMD_INFER_DIR")
    if not folder or not (Path(folder) / name).is_file():
        pytest.skip(f"set DEEPMD_INFER_DIR to deepmd-kit's source/tests/infer (holding {name})")
    return Path(folder) / name


@pytest.fixture(scope="module")
def fixture_pb(tmp_path_factory):
    pbtxt = fixture("fparam_aparam.pbtxt")
    convert = pytest.importorskip("deepmd.tf.utils.convert")
    pb = tmp_path_factory.mktemp("fixture") / "fparam_aparam.pb"
    convert.convert_pbtxt_to_pb(str(pbtxt), str(pb))
    return pb


@pytest.mark.parametrize("name, fparam", [("fparam_aparam.yaml", FIXTURE_PARAM), ("fparam_aparam_default.yaml", None),
                                          ("fparam_aparam_default.yaml", FIXTURE_PARAM), ("pb", FIXTURE_PARAM)])
def test_deepmd_fixture_fparam_aparam(name, fparam, request):
    """The testcase mixes two sources: its energies, forces and virials are TF's, its descriptor and
    fitting_last_layer dpmodel's, and the two differ by 3e-8 because TF's environment op computes the switch
    width rcut - rcut_smth in float32 (SeAConfig.float32_switch, set when minidp reads a .pb). So the .pb
    matches TF's values to 1e-10 and dpmodel's to 1e-7; the .yaml (dpmodel's own form) the reverse."""
    import yaml

    path = request.getfixturevalue("fixture_pb") if name == "pb" else fixture(name)
    case = yaml.safe_load(fixture("fparam_aparam-testcase.yaml").read_text())
    result = case["results"][0]
    dp = DeepPot(path, workers=1, progress=False)
    assert (dp.get_dim_fparam(), dp.get_dim_aparam(), dp.get_type_map(), dp.get_rcut()) == (1, 1, ["O"], 6.0)
    assert dp.has_default_fparam() == ("default" in name)
    box = np.eye(3).reshape(1, 9) * 13.0
    tf_tol, dpmodel_tol = (1e-10, 1e-7) if name == "pb" else (1e-7, 1e-12)
    e, f, v, ae, av = dp.eval(FIXTURE_COORD, box, [0] * 6, atomic=True, fparam=fparam, aparam=[FIXTURE_PARAM] * 6)
    np.testing.assert_allclose(ae.reshape(-1), FIXTURE_AE, rtol=0, atol=tf_tol)
    np.testing.assert_allclose(f.reshape(-1), FIXTURE_F, rtol=0, atol=tf_tol)
    np.testing.assert_allclose(av.reshape(-1), np.array(result["atomic_virial"]).reshape(-1), rtol=0, atol=tf_tol)
    np.testing.assert_allclose(e[0, 0], sum(FIXTURE_AE), rtol=0, atol=tf_tol)
    D = dp.eval_descriptor(FIXTURE_COORD, box, [0] * 6, fparam=fparam, aparam=[FIXTURE_PARAM] * 6)
    np.testing.assert_allclose(D.reshape(-1), np.array(result["descriptor"]).reshape(-1), rtol=0, atol=dpmodel_tol)
    ll = dp.eval_fitting_last_layer(FIXTURE_COORD, box, [0] * 6, fparam=fparam, aparam=[FIXTURE_PARAM] * 6)
    np.testing.assert_allclose(ll.reshape(-1), np.array(result["fit_ll"]).reshape(-1), rtol=0, atol=dpmodel_tol)
    if name != "pb":  # the .pb stores the training script's model section too, with deepmd-kit's defaults
        assert dp.get_model_def_script() == case["model_def_script"]


# ---------------------------------------------------------------------------
# Systems with fparam.npy / aparam.npy: eval, test, eval-desc, model-devi, change-bias, compress
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def param_system(tmp_path_factory):
    """A labelled deepmd/npy system of 4 frames with fparam.npy (nf, 1) and aparam.npy (nf, natoms * 2), in
    two sets, and a model taking them (with atom_ener and an excluded type)."""
    root = tmp_path_factory.mktemp("params")
    opts = Options(nfp=1, nap=2, atom_ener=(0.5, None), exclude=(1,))
    model = minidp_model(opts, 40)
    save_model(root / "model.dp", model)
    save_model(root / "model2.dp", minidp_model(opts, 41))
    coords, cells, types = frames(40, nf=4, natoms=6)
    fparam, aparam = params(opts, 4, 6, 40)
    system = root / "sys"
    system.mkdir()
    (system / "type.raw").write_text("\n".join(map(str, types)) + "\n")
    (system / "type_map.raw").write_text("O\nH\n")
    rng = np.random.default_rng(40)
    for k, rows in enumerate((slice(0, 2), slice(2, 4))):
        s = system / f"set.{k:03d}"
        s.mkdir()
        np.save(s / "coord.npy", coords[rows].reshape(2, -1))
        np.save(s / "box.npy", cells[rows].reshape(2, 9))
        np.save(s / "energy.npy", rng.normal(size=2))
        np.save(s / "force.npy", rng.normal(size=(2, 18)))
        np.save(s / "fparam.npy", fparam[rows])
        np.save(s / "aparam.npy", aparam[rows].reshape(2, -1))
    ref = DeepPot(model).eval(coords, cells, types, atomic=True, fparam=fparam, aparam=aparam)
    return root, system, ref, (coords, cells, types, fparam, aparam)


def test_eval_and_eval_desc_read_the_systems_parameters(param_system, tmp_path):
    root, system, ref, (coords, cells, types, fparam, aparam) = param_system
    assert main(["eval", "-m", str(root / "model.dp"), "-s", str(system), "-o", str(tmp_path / "out")]) == 0
    energy = np.concatenate([np.load(p / "energy.npy") for p in sorted((tmp_path / "out").glob("set.*"))])
    np.testing.assert_allclose(energy.reshape(-1), ref[0][:, 0], rtol=1e-12)
    # the labelled output keeps the parameters it was labelled with
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "set.000" / "aparam.npy"), aparam.reshape(4, -1))
    assert main(["eval-desc", "-m", str(root / "model.dp"), "-s", str(system), "-o", str(tmp_path / "desc")]) == 0
    D = DeepPot(root / "model.dp").eval_descriptor(coords, cells, types, fparam=fparam, aparam=aparam)
    np.testing.assert_allclose(np.load(tmp_path / "desc" / "sys.npy"), D, rtol=1e-12)


def test_test_and_model_devi_and_change_bias_read_them(param_system, tmp_path, capsys):
    from minidp.active.change_bias import bias_from_data
    from minidp.active.model_devi import Ensemble, system_deviations

    root, system, ref, (coords, cells, types, fparam, aparam) = param_system
    assert main(["test", "-m", str(root / "model.dp"), "-s", str(system)]) == 0
    energies = np.concatenate([np.load(system / f"set.{k:03d}" / "energy.npy") for k in (0, 1)])
    rmse = np.sqrt(np.mean((ref[0][:, 0] - energies) ** 2))
    assert f"{rmse:.6e}"[:5] in capsys.readouterr().out
    ens = Ensemble([root / "model.dp", root / "model2.dp"], workers=1, progress=False)
    _, devi = system_deviations(ens, system)
    E, F, W = ens.predict(coords, cells, types, fparam, aparam)
    np.testing.assert_allclose(E[0], ref[0][:, 0], rtol=1e-12)
    assert devi.shape == (4, 7) and devi[:, 3].max() > 0
    # change-bias: the excluded type's bias is not fitted (its atoms have no energy)
    dp = DeepPot(root / "model.dp")
    new = bias_from_data(dp, [system], "change")
    assert new[1] == dp.model.bias[1] and new[0] != dp.model.bias[0]
    assert main(["change-bias", str(root / "model.dp"), "-s", str(system), "-o", str(tmp_path / "cb.dp")]) == 0
    assert load_model(tmp_path / "cb.dp").fitting_input.numb_aparam == 2


def test_compress_keeps_the_fitting(param_system, tmp_path):
    root, _, ref, (coords, cells, types, fparam, aparam) = param_system
    assert main(["compress", "-i", str(root / "model.dp"), "-o", str(tmp_path / "c.dp"), "--min-nbor-dist",
                 "0.9"]) == 0
    back = load_model(tmp_path / "c.dp")
    model = load_model(root / "model.dp")
    assert back.descriptor.compress is not None
    for a, b in zip(back.fitting, model.fitting):
        for la, lb in zip(a.layers, b.layers):
            np.testing.assert_array_equal(la.W, lb.W)
    np.testing.assert_array_equal(back.fitting_input.aparam_inv_std, model.fitting_input.aparam_inv_std)
    assert (back.atom_ener, back.atom_exclude_types) == (model.atom_ener, model.atom_exclude_types)
    e = DeepPot(back).eval(coords, cells, types, fparam=fparam, aparam=aparam)[0]
    assert np.abs(e - ref[0]).max() <= 1e-6 * np.abs(ref[0]).max()


@pytest.mark.parametrize("remove, message", [
    ("fparam.npy", r"system .*sys has no fparam.npy; the model takes 1 numbers per frame \(numb_fparam\) and has "
                   r"no default_fparam"),
    ("aparam.npy", r"system .*sys has no aparam.npy; the model takes 2 numbers per atom \(numb_aparam\)"),
])
def test_a_system_without_the_models_parameters_is_refused(param_system, tmp_path, capsys, remove, message):
    import shutil

    root, system, _, _ = param_system
    copy_ = tmp_path / "sys"
    shutil.copytree(system, copy_)
    for s in copy_.glob("set.*"):
        (s / remove).unlink()
    assert main(["test", "-m", str(root / "model.dp"), "-s", str(copy_)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err)


def test_sets_must_hold_the_same_parameters(param_system, tmp_path):
    import shutil

    from minidp.io.systems import lazy_system

    _, system, _, _ = param_system
    copy_ = tmp_path / "sys"
    shutil.copytree(system, copy_)
    (copy_ / "set.001" / "fparam.npy").unlink()
    with pytest.raises(ValueError, match=r"set.001 holds parameters \{'aparam': 2\} .* but .*set.000 holds "
                                         r"\{'fparam': 1, 'aparam': 2\}; expected the same in every set"):
        lazy_system(copy_)


# ---------------------------------------------------------------------------
# ASE and dpdata
# ---------------------------------------------------------------------------


def test_ase_calculator_takes_parameters_from_atoms_info():
    pytest.importorskip("ase")
    from ase import Atoms

    from minidp.md.calculator import MiniDPCalculator

    opts = Options(nfp=1, nap=1)
    dp = DeepPot(minidp_model(opts, 50), workers=1, progress=False)
    coords, cells, types = frames(50, nf=1)
    atoms = Atoms([TYPE_MAP[t] for t in types], positions=coords[0], cell=cells[0], pbc=True,
                  calculator=MiniDPCalculator(dp))
    atoms.info["fparam"], atoms.info["aparam"] = [0.2], np.full((7, 1), -0.1)
    energy = atoms.get_potential_energy()
    e, f, _ = dp.eval(coords, cells, types, fparam=[0.2], aparam=[-0.1])
    assert isinstance(energy, np.floating) and energy.ravel()[0] == e[0, 0]  # numpy, as deepmd-kit's
    np.testing.assert_array_equal(atoms.get_forces(), f[0])


def test_dpdata_driver(tmp_path):
    dpdata = pytest.importorskip("dpdata")
    import minidp_dpdata  # noqa: F401  registers "minidp" (an installed minidp: the entry point)

    model = minidp_model(Options(), 51)
    save_model(tmp_path / "m.dp", model)
    coords, cells, types = frames(51, nf=2)
    system = dpdata.System(data={"atom_names": ["H", "O"], "atom_numbs": [int((types == 1).sum()),
                                                                         int((types == 0).sum())],
                                 "atom_types": 1 - types, "coords": coords, "cells": cells, "orig": np.zeros(3),
                                 "nopbc": False})
    e, f, v = DeepPot(model).eval(coords, cells, types)
    for dp in (str(tmp_path / "m.dp"), DeepPot(model)):
        labelled = system.predict(dp, driver="minidp")
        np.testing.assert_allclose(labelled["energies"], e[:, 0], rtol=1e-12)
        np.testing.assert_allclose(labelled["forces"], f, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(labelled["virials"], v.reshape(2, 3, 3), rtol=1e-12, atol=1e-12)
        assert labelled["atom_names"] == ["H", "O"]


def test_dpdata_plugin_is_declared_and_imports_lightly():
    """pyproject names the driver in dpdata's entry-point group; importing it (which every `import dpdata`
    does once minidp is installed) loads neither minidp's model code nor Numba."""
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["dpdata.plugins"]
    assert list(eps.values()) == ["minidp_dpdata:MiniDPDriver"]
    code = ("import sys, dpdata, minidp_dpdata as m; assert m.MiniDPDriver.__name__; "
            "print(sorted(k for k in sys.modules if k.startswith(('minidp', 'numba'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['minidp_dpdata']"
