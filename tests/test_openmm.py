"""minidp's force in OpenMM (minidp.md.openmm): DeepPot's energy and forces through OpenMM's units, in
periodic (orthorhombic, triclinic) and open systems; energy conserved in NVE; bad input refused in one line.

OpenMM's Reference platform keeps forces in double precision, so the comparisons are at round-off.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

ANGSTROM_PER_NM = 10.0


@pytest.fixture(scope="module")
def omm():
    return pytest.importorskip("openmm")


def water_system(omm, names, cell=None):
    """An openmm.System with one particle per name (element masses) and, given a cell (Angstrom), that box."""
    system = omm.System()
    for name in names:
        system.addParticle(omm.app.element.get_by_symbol(name).mass)
    if cell is not None:
        system.setDefaultPeriodicBoxVectors(*(omm.Vec3(*row) for row in cell / ANGSTROM_PER_NM))
    return system


def openmm_energy_forces(omm, context, x, cell=None):
    """(E eV, F (natoms, 3) eV/Angstrom) that OpenMM reports at positions x and box cell (Angstrom)."""
    from openmm import unit

    from minidp.md.openmm import KJ_PER_MOL_PER_EV

    if cell is not None:
        context.setPeriodicBoxVectors(*(omm.Vec3(*row) for row in cell / ANGSTROM_PER_NM))
    context.setPositions(x / ANGSTROM_PER_NM)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_MOL_PER_EV
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, forces / (KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM)


def reference_context(omm, system):
    return omm.Context(system, omm.VerletIntegrator(0.0005), omm.Platform.getPlatformByName("Reference"))


def assert_matches_deeppot(omm, context, dp, x, cell, types):
    e_omm, f_omm = openmm_energy_forces(omm, context, x, cell)
    e, f, _ = dp.eval(x[None], None if cell is None else cell[None], types)
    assert e_omm == pytest.approx(e[0, 0], rel=1e-10, abs=0)
    np.testing.assert_allclose(f_omm, f[0], rtol=0, atol=1e-10)


def test_the_conversion_factor_is_e_times_avogadro_as_openmm_has_it(omm):
    from openmm import unit

    from minidp.md.openmm import KJ_PER_MOL_PER_EV

    ev = (1 * unit.elementary_charge * unit.volt * unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.kilojoule_per_mole)
    assert KJ_PER_MOL_PER_EV == pytest.approx(ev, rel=1e-15)
    assert KJ_PER_MOL_PER_EV == 1.602176634e-19 * 6.02214076e23 / 1000


def test_periodic_water_frames_match_deeppot(omm, water_frames, water_dp):
    from minidp.md.openmm import add_minidp_force

    coords, cells, types = water_frames
    names = [water_dp.get_type_map()[t] for t in types]
    system = water_system(omm, names, cells[0].reshape(3, 3).astype(np.float64))
    force = add_minidp_force(system, water_dp, names, periodic=True)
    assert force.usesPeriodicBoundaryConditions() and force.getName() == "minidp"
    context = reference_context(omm, system)
    for x, cell in zip(coords, cells):
        assert_matches_deeppot(omm, context, water_dp, x.reshape(-1, 3).astype(np.float64),
                               cell.reshape(3, 3).astype(np.float64), types)


def test_triclinic_box_in_openmms_reduced_form_matches_deeppot(omm, water_frames, water_dp):
    from minidp.md.openmm import add_minidp_force

    coords, cells, types = water_frames
    cell = cells[0].reshape(3, 3).astype(np.float64)
    L = cell[0, 0]
    # reduced form: a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz), ax >= 2|bx|, 2|cx|; by >= 2|cy|
    sheared = np.array([[L, 0, 0], [0.2 * L, 0.95 * L, 0], [-0.15 * L, 0.1 * L, 1.05 * L]])
    # the same fractional coordinates in the sheared cell
    x = coords[0].reshape(-1, 3).astype(np.float64) @ np.linalg.inv(cell) @ sheared
    names = [water_dp.get_type_map()[t] for t in types]
    system = water_system(omm, names, sheared)
    add_minidp_force(system, water_dp, names, periodic=True)
    context = reference_context(omm, system)
    assert_matches_deeppot(omm, context, water_dp, x, sheared, types)
    # OpenMM may hand over other images of the atoms: the same energy and forces
    shifted = x + np.arange(len(x))[:, None] % 3 * sheared[1] - (np.arange(len(x))[:, None] % 2) * sheared[2]
    e_omm, f_omm = openmm_energy_forces(omm, context, shifted, sheared)
    e, f, _ = water_dp.eval(x[None], sheared[None], types)
    assert e_omm == pytest.approx(e[0, 0], rel=1e-10, abs=0)
    np.testing.assert_allclose(f_omm, f[0], rtol=0, atol=1e-10)


def test_open_cluster_from_a_topology_matches_deeppot(omm, water_frames, water_dp):
    from openmm import app

    from minidp.md.openmm import add_minidp_force

    coords, _, types = water_frames
    x = coords[0].reshape(-1, 3).astype(np.float64)
    # the 30 atoms nearest the middle of the box, as they stand (no images): an open cluster
    near = np.argsort(np.linalg.norm(x - x.mean(axis=0), axis=1))[:30]
    x, cluster_types = x[near], types[near]
    topology = app.Topology()
    residue = topology.addResidue("CLU", topology.addChain())
    for k, t in enumerate(cluster_types):
        symbol = water_dp.get_type_map()[t]
        topology.addAtom(f"{symbol}{k}", app.element.get_by_symbol(symbol), residue)
    system = water_system(omm, [water_dp.get_type_map()[t] for t in cluster_types])
    force = add_minidp_force(system, water_dp, topology, periodic=False)
    assert not force.usesPeriodicBoundaryConditions()
    assert_matches_deeppot(omm, reference_context(omm, system), water_dp, x, None, cluster_types)


def test_a_serialized_system_keeps_the_model(omm, water_frames, water_dp):
    from minidp.md.openmm import add_minidp_force

    coords, cells, types = water_frames
    names = [water_dp.get_type_map()[t] for t in types]
    cell = cells[0].reshape(3, 3).astype(np.float64)
    system = water_system(omm, names, cell)
    add_minidp_force(system, water_dp, names, periodic=True)
    copy = omm.XmlSerializer.deserialize(omm.XmlSerializer.serialize(system))
    assert_matches_deeppot(omm, reference_context(omm, copy), water_dp,
                           coords[0].reshape(-1, 3).astype(np.float64), cell, types)


def test_nve_conserves_the_total_energy(omm, water_frames, water_dp):
    from openmm import unit

    from minidp.md.openmm import add_minidp_force

    coords, cells, types = water_frames
    names = [water_dp.get_type_map()[t] for t in types]
    system = water_system(omm, names, cells[0].reshape(3, 3).astype(np.float64))
    add_minidp_force(system, water_dp, names, periodic=True)
    integrator = omm.VerletIntegrator(0.5 * unit.femtosecond)
    context = omm.Context(system, integrator, omm.Platform.getPlatformByName("Reference"))
    context.setPositions(coords[0].reshape(-1, 3).astype(np.float64) / ANGSTROM_PER_NM)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    e_pot, e_tot = [], []
    for _ in range(6):
        state = context.getState(getEnergy=True)
        potential = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        e_pot.append(potential)
        e_tot.append(potential + state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        integrator.step(4)
    # energy flows between potential and kinetic (over 100 kJ/mol in these 10 fs) while the total
    # stays put to the integrator's O(dt^2) wobble (about 2 kJ/mol): forces = -grad E through the
    # units (a force off by a factor would show as a total that moves with the potential)
    swing, drift = np.ptp(e_pot), np.ptp(e_tot)
    assert swing > 10.0
    assert drift < 0.05 * swing, (swing, drift)


@pytest.mark.parametrize("case, error, message", [
    ("system", TypeError, r"^system must be an openmm.System, got str$"),
    ("integer types", TypeError, r"^atoms\[0\] must be an element name \(a str\), got int 0$"),
    ("not a list", TypeError, r"^atoms must be an openmm.app.Topology or a list of element names, got str 'OHHH'$"),
    ("count", ValueError, r"^atoms gives 3 names but the system has 4 particles; expected one name per particle$"),
    ("element", ValueError, r"^element\(s\) \['C'\] are not in the model's type map \['O', 'H'\]$"),
    ("periodic", TypeError, r"^periodic: expected true or false, got str 'yes'$"),
    ("no element", ValueError, r"^atom 3 \(M of residue HOH 1\) has no element; minidp types atoms by element$"),
    ("model", FileNotFoundError, r"model file .*missing.dp does not exist"),
])
def test_bad_input_is_refused_in_one_line(omm, water_dp, case, error, message, tmp_path):
    from openmm import app

    from minidp.md.openmm import add_minidp_force

    system = water_system(omm, ["O", "H", "H", "H"])
    topology = app.Topology()
    residue = topology.addResidue("HOH", topology.addChain(), id="1")
    for name, symbol in (("O", "O"), ("H1", "H"), ("H2", "H"), ("M", None)):
        topology.addAtom(name, symbol and app.element.get_by_symbol(symbol), residue)
    args = {"system": system, "model": water_dp, "atoms": ["O", "H", "H", "H"], "periodic": False}
    args.update({
        "system": {"system": "water"},
        "integer types": {"atoms": np.array([0, 1, 1, 1])},
        "not a list": {"atoms": "OHHH"},
        "count": {"atoms": ["O", "H", "H"]},
        "element": {"atoms": ["O", "H", "H", "C"]},
        "periodic": {"periodic": "yes"},
        "no element": {"atoms": topology},
        "model": {"model": tmp_path / "missing.dp"},
    }[case])
    with pytest.raises(error, match=message) as err:
        add_minidp_force(args["system"], args["model"], args["atoms"], periodic=args["periodic"])
    assert "\n" not in str(err.value)
    assert system.getNumForces() == 0


def test_an_error_during_a_step_reaches_openmm_in_one_line(omm, water_dp):
    from minidp.md.openmm import add_minidp_force

    system = water_system(omm, ["O", "H", "H"])
    add_minidp_force(system, water_dp, ["O", "H", "H"], periodic=False)
    context = reference_context(omm, system)
    with pytest.raises(omm.OpenMMException, match="atoms 1 and 2 are on the same spot") as err:
        openmm_energy_forces(omm, context, np.array([[0.0, 0, 0], [0.96, 0, 0], [0.96, 0, 0]]))
    assert "\n" not in str(err.value)


def test_the_module_imports_without_openmm_and_says_how_to_get_it():
    code = ("import sys; sys.modules['openmm'] = None\n"
            "import minidp.md.openmm as m\n"
            "try:\n    m.add_minidp_force(None, None, [], periodic=True)\n"
            "except ImportError as err:\n    print(err)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("minidp.md.openmm needs openmm (pip install openmm): ")
    assert r.stdout.count("\n") == 1
