"""pair_style deepmd's fparam, aparam, fparam_from_compute, fparam_from_fix and aparam_from_compute under
minidp lammps.

A small random model with two frame and two atomic parameters (tests/test_model_options.py builds it) runs
``run 0`` in LAMMPS with the parameters given as numbers, or read from computes or a fix each step as
deepmd-kit's plugin reads them; the energy and the forces LAMMPS reports are DeepPot.eval's with the same parameters.
A model and a pair style that do not go together are refused in one line before any step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minidp import DeepPot
from minidp.io.serialization import save_model
from minidp.md.lammps import LammpsInputError, MinidpForceField, parse_pair_style
from tests.test_md_decks import error_line, minidp_lammps, need_lammps, read_dump
from tests.test_model_options import Options, frames, minidp_model

PARAMS = Options(nfp=2, nap=2)
DUMP = "write_dump all custom forces.dump id type x y z fx fy fz modify format float %22.15e sort id\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """.dp files: 'params' takes 2 fparam and 2 aparam, 'plain' none, 'default' 1 fparam with a default."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, opts in (("params", PARAMS), ("plain", Options()), ("default", Options(nfp=1, default=True))):
        out[name] = folder / f"{name}.dp"
        save_model(out[name], minidp_model(opts, 11))
    return out


def write_data(path: Path, x: np.ndarray, types: np.ndarray, cell: np.ndarray) -> None:
    """A LAMMPS data file (atom_style atomic) of one frame in an orthogonal box from 0."""
    rows = "".join(f"{k + 1} {t + 1} {p[0]:.17g} {p[1]:.17g} {p[2]:.17g}\n" for k, (t, p) in enumerate(zip(types, x)))
    path.write_text(f"minidp test\n\n{len(x)} atoms\n2 atom types\n\n0 {cell[0, 0]:.17g} xlo xhi\n"
                    f"0 {cell[1, 1]:.17g} ylo yhi\n0 {cell[2, 2]:.17g} zlo zhi\n\nMasses\n\n1 16\n2 1\n\n"
                    f"Atoms # atomic\n\n{rows}")


def run_zero(tmp_path: Path, model: Path, keywords: str, boundary: str = "p p p", extra: str = ""):
    """run 0 of the test frame with 'pair_style deepmd MODEL KEYWORDS': (pe, forces by id, x, types, cell)."""
    coords, cells, types = frames(3, nf=1, natoms=12)
    x, cell = coords[0], cells[0]
    write_data(tmp_path / "frame.lmp", x, types, cell)
    deck = (f"units metal\nboundary {boundary}\natom_style atomic\nread_data frame.lmp\n{extra}"
            f"pair_style deepmd {model} {keywords}\npair_coeff * * O H\n"
            "thermo_style custom step pe\nrun 0\nprint \"$(pe:%.15e)\" file pe.txt screen no\n" + DUMP)
    (tmp_path / "in.lammps").write_text(deck)
    done = minidp_lammps(tmp_path, "in.lammps")
    assert done.returncode == 0, done.stderr[-2000:]
    pe = float((tmp_path / "pe.txt").read_text())
    return pe, read_dump(tmp_path / "forces.dump")[:, 5:8], x, types, cell


@need_lammps
def test_constant_parameters_are_deeppots(tmp_path, models):
    pe, forces, x, types, cell = run_zero(tmp_path, models["params"], "fparam 0.3 -0.7 aparam 0.2 0.5")
    e, f, _ = DeepPot(models["params"]).eval(x[None], cell[None], types, fparam=[0.3, -0.7], aparam=[0.2, 0.5])
    assert pe == pytest.approx(e[0, 0], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(forces, f[0], rtol=0, atol=1e-10)


@need_lammps
def test_parameters_from_computes_each_step(tmp_path, models):
    """fparam: the global vector of 'compute reduce sum x y'; aparam: each atom's x and y ('compute
    property/atom x y'); open boundaries, so the local centres and their ghost images are evaluated."""
    computes = "compute fp all reduce sum x y\ncompute ap all property/atom x y\n"
    pe, forces, x, types, _ = run_zero(tmp_path, models["params"], "fparam_from_compute fp aparam_from_compute ap",
                                       boundary="f f f", extra=computes)
    e, f, _ = DeepPot(models["params"]).eval(x[None], None, types, fparam=x[:, :2].sum(axis=0), aparam=x[:, :2])
    assert pe == pytest.approx(e[0, 0], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(forces, f[0], rtol=0, atol=1e-10)


@need_lammps
def test_one_fparam_from_a_global_scalar(tmp_path, models):
    """numb_fparam 1: the compute's global scalar (here 'compute reduce sum x' of one input)."""
    extra = "compute fx all reduce sum x\n"
    pe, forces, x, types, cell = run_zero(tmp_path, models["default"], "fparam_from_compute fx", extra=extra)
    e, f, _ = DeepPot(models["default"]).eval(x[None], cell[None], types, fparam=[x[:, 0].sum()])
    assert pe == pytest.approx(e[0, 0], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(forces, f[0], rtol=0, atol=1e-10)


@need_lammps
@pytest.mark.parametrize("model, fix, keywords, numbers", [
    # elements 2 and 3 (1-based) of the fix's global vector of three values
    ("params", "fix fv all ave/time 1 1 1 v_b v_a v_b\n", "fparam_from_fix fv 2 aparam 0.2 0.5",
     "fparam 0.3 -0.7 aparam 0.2 0.5"),
    # no index: the fix's global scalar
    ("default", "fix fv all ave/time 1 1 1 v_b\n", "fparam_from_fix fv", "fparam -0.7"),
])
def test_fparam_from_a_fix_is_the_same_numbers(tmp_path, models, model, fix, keywords, numbers):
    """fparam_from_fix ID [I] (a fix ave/time of constant variables) gives the energy and forces of the same
    fparam given as numbers, to the bit."""
    extra = "variable a equal 0.3\nvariable b equal -0.7\n" + fix
    (tmp_path / "fix").mkdir()
    (tmp_path / "numbers").mkdir()
    pe, forces, *_ = run_zero(tmp_path / "fix", models[model], keywords, extra=extra)
    pe0, forces0, *_ = run_zero(tmp_path / "numbers", models[model], numbers)
    assert pe == pe0 and np.array_equal(forces, forces0)


@need_lammps
@pytest.mark.parametrize("fix, keywords, message", [
    ("", "fparam_from_compute nope aparam 1 2", "compute nope (for the pair style's parameters) does not exist"),
    ("", "fparam_from_fix nope aparam 1 2", "fix nope (for the pair style's fparam) does not exist"),
    ("fix fv all ave/time 1 1 1 v_a v_a\n", "fparam_from_fix fv aparam 1 2", "fix fv has no global scalar"),
    ("fix fv all ave/time 1 1 1 v_a v_a\n", "fparam_from_fix fv 2 aparam 1 2",
     "fix fv's global vector has 2 values; fparam_from_fix fv 2 takes 2 from element 2 on"),
])
def test_a_compute_or_fix_that_gives_no_fparam_is_named(tmp_path, models, fix, keywords, message):
    coords, cells, types = frames(3, nf=1, natoms=12)
    write_data(tmp_path / "frame.lmp", coords[0], types, cells[0])
    (tmp_path / "in.lammps").write_text(f"units metal\natom_style atomic\nread_data frame.lmp\nvariable a equal 1\n"
                                        f"{fix}pair_style deepmd {models['params']} {keywords}\n"
                                        "pair_coeff * * O H\nrun 0\n")
    done = minidp_lammps(tmp_path, "in.lammps")
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@need_lammps
def test_a_model_default_fparam_stands_in(tmp_path, models):
    pe, _, x, types, cell = run_zero(tmp_path, models["default"], "")
    e, _, _ = DeepPot(models["default"]).eval(x[None], cell[None], types)
    assert pe == pytest.approx(e[0, 0], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("model, keywords, message", [
    ("plain", "fparam 1.0", "fparam has shape (1,) but this model takes no fparam (numb_fparam = 0)"),
    ("plain", "aparam_from_compute c", "takes no aparam (numb_aparam = 0), yet aparam_from_compute is given"),
    ("plain", "fparam_from_fix f 1", "takes no fparam (numb_fparam = 0), yet fparam_from_fix is given"),
    ("params", "aparam 0.1 0.2", ("needs fparam (2 numbers, numb_fparam) and has no default_fparam: add "
                                  "'fparam V1 ... V2', 'fparam_from_compute ID' or 'fparam_from_fix ID' "
                                  "to pair_style")),
    ("params", "fparam 1 2", "needs aparam (2 numbers per atom, numb_aparam)"),
    ("params", "fparam 1 2 3 aparam 1 2", "fparam has shape (3,); this model takes 2 numbers per frame"),
])
def test_models_and_parameters_that_do_not_match_are_refused(models, model, keywords, message):
    with pytest.raises(LammpsInputError) as err:
        MinidpForceField(parse_pair_style([str(models[model]), *keywords.split()], "deepmd"))
    assert message in str(err.value) and "\n" not in str(err.value)


@need_lammps
def test_refused_before_any_step_in_one_line(tmp_path, models):
    (tmp_path / "in.lammps").write_text(f"units metal\nregion b block 0 5 0 5 0 5\ncreate_box 2 b\nmass * 1\n"
                                        f"pair_style deepmd {models['params']}\npair_coeff * * O H\nrun 1\n")
    assert "needs fparam (2 numbers, numb_fparam)" in error_line(minidp_lammps(tmp_path, "in.lammps"))
