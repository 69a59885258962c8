"""i-PI with minidp's forces: a short NVT run and a path-integral (PIMD) run of the water box.

    python examples/ipi/run.py [--model M] [--frames F] [--steps 40] [--beads 4] [--out out/ipi]

For each run, i-PI (``i-pi input.xml``) is the server and ``minidp ipi -m MODEL --unix NAME -c init.xyz``
its force client on a UNIX socket; the inputs are those of the cross-check
(validation/md_engines.py: 0.5 fs steps at 300 K, Langevin for NVT, PILE-L for the path integral).
Writes each run's folder (input.xml, init.xyz, i-PI's sim.out and RESTART) and ipi.png: temperature
and conserved quantity against time for both runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repository's validation helpers

from validation import md_engines as md  # noqa: E402

SHIPPED = ROOT / "minidp" / "examples" / "water"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidp.io.figures import save_figure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=SHIPPED / "model.dp")
    p.add_argument("--frames", type=Path, default=SHIPPED / "frames", help="deepmd/npy system; its first frame")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--beads", type=int, default=4, help="beads of the path-integral run")
    p.add_argument("--out", type=Path, default=Path("out/ipi"))
    args = p.parse_args()

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, nbeads in (("NVT", 1), (f"PIMD, {args.beads} beads", args.beads)):
        run = md.run_ipi("minidp", args.frames, args.model, args.out / f"beads-{nbeads}", args.steps, nbeads)
        props = md.read_ipi_properties(run.properties)
        # columns: step, time (ps), conserved (eV), temperature (K), potential (eV), pressure (bar)
        t_fs = props[:, 1] * 1000
        ax_t.plot(t_fs, props[:, 3], label=label)
        ax_e.plot(t_fs, props[:, 2] - props[0, 2], label=label)
        print(f"{label}: {args.steps} steps in {run.seconds:.1f} s, T = {props[-1, 3]:.1f} K, "
              f"potential {props[-1, 4]:.3f} eV -> {run.folder}")
    ax_t.set_xlabel("time (fs)")
    ax_t.set_ylabel("temperature (K)")
    ax_e.set_xlabel("time (fs)")
    ax_e.set_ylabel("conserved quantity - initial (eV)")
    ax_t.legend()
    print(f"plot -> {save_figure(fig, args.out / 'ipi.png')}")


if __name__ == "__main__":
    main()
