"""A short NVE molecular dynamics of the water box with ASE, showing energy conservation.

    python examples/nve_water.py [--model M] [--frames F] [--steps 400] [--out out/nve]

Velocity Verlet at 0.5 fs from 300 K Maxwell-Boltzmann velocities. A
potential whose forces are the exact negative gradient of its energy keeps
E_kin + E_pot constant up to the integrator's O(dt^2) wobble; a drift would
mean forces and energy disagree (or a neighbour list that misses atoms).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _water import default_frames, default_model, water_box


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from minidp.md.calculator import MiniDPCalculator
    from minidp.io.figures import save_figure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--frames", type=Path, default=None)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dt", type=float, default=0.5, help="fs")
    p.add_argument("--out", type=Path, default=Path("out/nve"))
    args = p.parse_args()

    atoms = water_box(args.frames or default_frames())
    atoms.calc = MiniDPCalculator(str(args.model or default_model()))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=args.dt * units.fs)
    t, epot, ekin = [], [], []

    def record():
        t.append(dyn.get_number_of_steps() * args.dt)
        epot.append(atoms.get_potential_energy())
        ekin.append(atoms.get_kinetic_energy())

    dyn.attach(record, interval=1)
    dyn.run(args.steps)
    epot, ekin = np.array(epot), np.array(ekin)
    etot = epot + ekin
    drift = np.polyfit(np.array(t) / 1000.0, etot / len(atoms), 1)[0]
    print(f"{len(atoms)} atoms, {args.steps} steps of {args.dt} fs: E_tot std {etot.std() * 1000 / len(atoms):.3f} "
          f"meV/atom, drift {drift * 1000:.3f} meV/atom/ps, E_pot std {epot.std() * 1000 / len(atoms):.3f} meV/atom")

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, (epot - etot[0]) / len(atoms) * 1000, label="potential")
    ax.plot(t, (ekin - ekin.mean()) / len(atoms) * 1000 + (epot - etot[0]).mean() / len(atoms) * 1000,
            label="kinetic (shifted)")
    ax.plot(t, (etot - etot[0]) / len(atoms) * 1000, "k", lw=2, label="total")
    ax.set(xlabel="time (fs)", ylabel="energy - E_tot(0) (meV/atom)", title="NVE water: total energy is conserved")
    ax.legend()
    print(f"wrote {save_figure(fig, args.out / 'nve.png')}")


if __name__ == "__main__":
    main()
