"""The learning curve: deepmd-kit's lcurve.out columns, written line by line (a line is whole
or absent), read back, and plotted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minidp.io.figures import save_figure
from minidp.io.outputs import safe_output
from minidp.training.loss import LossValue

# ---------------------------------------------------------------------------
# 4. Recording: the learning curve and checkpoints
# ---------------------------------------------------------------------------


def lcurve_quantities(virial: bool, terms: tuple[str, ...] = ()) -> list[str]:
    """The error fields shown, in deepmd-kit's (TensorFlow trainer's) order: rmse, rmse_e, rmse_ae, rmse_f,
    rmse_v, rmse_pf; terms: the extra loss terms on ("ae", "pf") and "mae" for mean absolute errors
    (mae_e, ... after rmse) (minidp.training.loss.shown_terms)."""
    kind = "mae" if "mae" in terms else "rmse"
    names = (["e"] + (["ae"] if "ae" in terms else []) + ["f"] + (["v"] if virial else [])
             + [t for t in ("pf", "gf") if t in terms])
    # deepmd-kit's generalized force term stays a squared error (rmse_gf) whatever loss_func says
    return ["rmse"] + [f"{'rmse' if q == 'gf' else kind}_{q}" for q in names]


def lcurve_columns(validation: bool, virial: bool, terms: tuple[str, ...] = ()) -> list[str]:
    """deepmd-kit's lcurve.out columns (validation first, then training, per quantity)."""
    sets = ["val", "trn"] if validation else ["trn"]
    return ["step"] + [f"{q}_{s}" for q in lcurve_quantities(virial, terms) for s in sets] + ["lr"]


def lcurve_line(step: int, errors: dict[str, LossValue], lr: float, virial: bool, terms: tuple[str, ...] = ()) -> str:
    """One line of lcurve.out: errors maps "val"/"trn" to that set's LossValue."""
    fields = lcurve_quantities(virial, terms)
    values = [getattr(errors[s], f) for f in fields for s in ("val", "trn") if s in errors]
    return f"{step:7d}" + "".join(f" {v:12.4e}" for v in values) + f" {lr:12.4e}\n"


def kept_lcurve(path: Path, step: int) -> str:
    """The lines of an existing lcurve.out before ``step`` (a run resumed from step's checkpoint
    writes the others again); ValueError unless it is a learning curve minidp wrote."""
    text = path.read_text()
    if not text.startswith("# step"):
        raise ValueError(f"{path} is not a learning curve (no '# step ...' header); refusing to append to it")
    lines = text.splitlines(keepends=True)
    return "".join(ln for ln in lines if ln.startswith("#") or (ln.split() and int(ln.split()[0]) < step))


def write_lcurve_line(path: Path, line: str, head: str | None = None, replace: bool = False) -> None:
    """Append a line to lcurve.out; with ``head`` (the header, or the kept lines of a resumed curve)
    write head + line as a whole new file instead, atomically (``replace``: onto an existing curve).

    The first line of a run goes the second way: a run that fails before it leaves no header-only
    file, and a run killed later leaves whole lines (each is one small write)."""
    if head is not None:
        with safe_output(path, "lcurve", overwrite=replace) as tmp:
            tmp.write_text(head + line)
        return
    with open(path, "a") as fh:
        fh.write(line)


def read_lcurve(path) -> dict[str, np.ndarray]:
    """An lcurve.out (minidp's or deepmd-kit's) as {column: values}; names from the '#' header."""
    path = Path(path)
    names = path.read_text().splitlines()[0].lstrip("#").split()
    data = np.atleast_2d(np.loadtxt(path))
    return {name: data[:, k] for k, name in enumerate(names)}


def plot_lcurves(curves: dict[str, Path], out: Path) -> Path:
    """Energy and force RMSE against the step, one line style per curve and set (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (label, path), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        c = read_lcurve(path)
        for ax, q, unit in ((axes[0], "e", "eV/atom"), (axes[1], "f", "eV/Å")):
            for s, style in (("trn", ":"), ("val", "-")):
                if f"rmse_{q}_{s}" in c:
                    ax.semilogy(c["step"], c[f"rmse_{q}_{s}"], style, color=color, label=f"{label} {s}")
            ax.set(xlabel="step", ylabel=f"RMSE ({unit})", title={"e": "energy", "f": "forces"}[q])
    axes[1].legend()
    return save_figure(fig, out)
