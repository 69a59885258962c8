"""Error statistics and parity plots, as `dp test` reports them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minidp.io.outputs import safe_output


def rmse_mae(predicted: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """sqrt(mean((p - l)^2)) and mean(|p - l|) over all entries."""
    diff = np.asarray(predicted, dtype=np.float64) - np.asarray(label, dtype=np.float64)
    return float(np.sqrt(np.mean(diff**2))), float(np.mean(np.abs(diff)))


def per_atom(values, natoms) -> np.ndarray:
    """Per-frame values (nf, ...) divided by each frame's number of atoms (an int, or (nf,))."""
    values = np.asarray(values, dtype=np.float64)
    # (nf, 1, ...) or a scalar: broadcast over the values of each frame
    n = np.asarray(natoms, dtype=np.float64)
    return values / (n.reshape((-1,) + (1,) * (values.ndim - 1)) if n.ndim else n)


def error_table(predicted: dict, labels: dict, natoms) -> str:
    """dp test's figures: energy, energy per atom, force, virial, virial per atom (RMSE and MAE).

    ``natoms``: the atoms of every frame (an int), or of each frame (nf,) for
    frames of several systems: the per-atom figures are then over E_f / natoms_f,
    dp test's weighted average over systems.
    """
    rows = []
    for key, unit in (("energy", "eV"), ("force", "eV/A"), ("virial", "eV")):
        if key not in labels:
            continue
        rmse, mae = rmse_mae(predicted[key], labels[key])
        rows.append(f"{key:<18} RMSE {rmse:.6e} {unit:<5} MAE {mae:.6e} {unit}")
        if key != "force":
            rmse, mae = rmse_mae(per_atom(predicted[key], natoms), per_atom(labels[key], natoms))
            rows.append(f"{key + '/atom':<18} RMSE {rmse:.6e} {unit:<5} MAE {mae:.6e} {unit}")
    return "\n".join(rows)


def save_figure(fig, path: Path, dpi: int = 120, overwrite: bool = True, inputs=()) -> Path:
    """Lay out, write as PNG and close a matplotlib figure, through :func:`minidp.io.outputs.safe_output`:
    all of it or nothing, replacing an existing file only if it is a PNG (and ``overwrite``)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with safe_output(path, "png", inputs, overwrite) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def parity_plots(predicted: dict, labels: dict, natoms: int, out: Path, names=("minidp", "label")) -> list[Path]:
    """One PNG per quantity: predicted against label, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("energy", "force", "virial"):
        if key not in labels:
            continue
        atomic = key in ("energy", "virial")
        x, y = ((per_atom(v[key], natoms) if atomic else np.asarray(v[key], dtype=np.float64)).ravel()
                for v in (labels, predicted))
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(x, y, ".", ms=2)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
        ax.set_xlabel(f"{key}{' per atom' if atomic else ''} ({names[1]})")
        ax.set_ylabel(f"{key}{' per atom' if atomic else ''} ({names[0]})")
        ax.set_title(f"RMSE {rmse_mae(y, x)[0]:.3g}")
        written.append(save_figure(fig, out / f"parity-{key}.png"))
    return written
