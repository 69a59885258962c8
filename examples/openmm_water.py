"""NVT water in OpenMM with minidp's forces: Langevin dynamics of the example water box at 300 K.

    OMP_NUM_THREADS=2 python examples/openmm_water.py [--model M] [--frames F] [--steps 300] [--every 25]

The 192-atom box of the shipped example (minidp/examples/water) gets minidp's potential through
minidp.md.openmm.add_minidp_force, velocities drawn at 300 K, and OpenMM's Langevin middle
integrator (friction 1/ps, 0.5 fs: water's O-H stretch, ~9 fs, needs the short step without
constraints). Every ``--every`` steps it prints the potential and kinetic energies (eV) and the
instantaneous temperature T = 2 E_kin / (N_dof k_B), N_dof = 3N - 3 (the centre of mass is held
still). In a box this small T fluctuates by about sqrt(2 / N_dof) = 6% (18 K), the initial draw
included, and the thermostat pulls it towards 300 K on its time scale 1/friction = 1 ps, longer
than the default 150 fs run (try --steps 4000). Needs openmm (pip install openmm); about 20 s for
300 steps on one core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _water import default_frames, default_model, water_frame


def main() -> None:
    import openmm
    from openmm import unit

    from minidp.md.openmm import KJ_PER_MOL_PER_EV, add_minidp_force

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--frames", type=Path, default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25, help="steps between reports")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    frame = water_frame(args.frames or default_frames())
    system = openmm.System()
    for name in frame.elements:
        system.addParticle(openmm.app.element.get_by_symbol(name).mass)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in frame.cell / 10.0))  # Angstrom -> nm
    system.addForce(openmm.CMMotionRemover())
    add_minidp_force(system, str(args.model or default_model()), frame.elements, periodic=True)

    temperature = 300.0 * unit.kelvin
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(args.seed)
    # the Reference platform: the time goes into minidp's evaluation, and it keeps forces in double
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(frame.positions / 10.0)
    context.setVelocitiesToTemperature(temperature, args.seed)

    n_dof = 3 * system.getNumParticles() - 3
    k_B = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    print(f"{system.getNumParticles()} atoms, Langevin at 300 K, 0.5 fs")
    print(f"{'step':>6} {'time/fs':>8} {'E_pot/eV':>14} {'E_kin/eV':>10} {'T/K':>7}")
    temperatures = []
    for step in range(0, args.steps + 1, args.every):
        if step:
            integrator.step(args.every)
        state = context.getState(getEnergy=True)
        e_pot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_MOL_PER_EV
        e_kin = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        temperatures.append(2.0 * e_kin / (n_dof * k_B))
        print(f"{step:6d} {step * 0.5:8.1f} {e_pot:14.4f} {e_kin / KJ_PER_MOL_PER_EV:10.4f} {temperatures[-1]:7.1f}")
    later = temperatures[len(temperatures) // 2:]
    print(f"mean temperature over the second half: {sum(later) / len(later):.1f} K (thermostat: 300 K, 1 ps)")


if __name__ == "__main__":
    main()
