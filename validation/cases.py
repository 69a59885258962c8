r"""The systems and the extra model the cross-checks run on, built from a given system's frames.

A check runs on a :class:`Geometry`: groups of frames (:class:`minidp.infer.Frames`),
each group sharing its atom types so that one ``eval`` call takes it. Cases that
cut atoms out of a frame (the small cell, the cluster) give one group per frame,
since how many atoms of each type they keep varies from frame to frame.

The geometries, from frames of a periodic system (lattice vectors as the rows
of the cell :math:`H`, positions as rows :math:`x`):

- the frames as given;
- sheared: :math:`H' = T H` with :math:`T` lower unitriangular (rows a, b + t a,
  c + t' a + t'' b) and :math:`x' = x H^{-1} T H`, every fractional coordinate kept;
- a small cell: the atoms whose fractional coordinates all lie below
  :math:`s = \ell / w_{\min}` in a cell :math:`s H` (edge about :math:`\ell`),
  less those that come closer than ``min_dist`` to an atom across the new faces;
- an open cluster: the atoms within ``radius`` of the cell's centre (nearest
  images), no cell;
- lone atoms: one atom of each type with no cell, and one in a cell wider than rcut.

Shape symbols: ``nf`` frames, ``natoms`` atoms per frame (``nloc`` inside minidp).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidp.io.outputs import atomic_path
from minidp.infer import Frames
from minidp.neighbor import build_neighbor_list, wrap


@dataclass(frozen=True)
class Geometry:
    """One check case's systems."""

    key: str  # short name, used in file names and in report.json
    title: str  # one line for the report
    groups: tuple[Frames, ...]  # frame groups; the frames of a group share atom_types
    labels: tuple[str, ...]  # one label per group, naming where it came from

    def __post_init__(self):
        if len(self.groups) != len(self.labels) or not self.groups:
            raise ValueError(f"{self.key}: {len(self.groups)} groups but {len(self.labels)} labels; "
                             "expected one label per group and at least one group")

    @property
    def nframes(self) -> int:
        return sum(g.coords.shape[0] for g in self.groups)

    @property
    def natoms(self) -> tuple[int, int]:
        """Fewest and most atoms in a frame."""
        sizes = [g.coords.shape[1] for g in self.groups]
        return min(sizes), max(sizes)

    @property
    def periodic(self) -> bool:
        return any(g.cells is not None for g in self.groups)


def _need_cells(frames: Frames, what: str) -> np.ndarray:
    if frames.cells is None:
        raise ValueError(f"{what} needs periodic frames (a cell per frame); these have cells=None")
    return frames.cells


def as_given(frames: Frames) -> Geometry:
    """Case 1: the frames unchanged."""
    return Geometry("1-as-given", "the system as given", (frames,), ("frames as given",))


# ---------------------------------------------------------------------------
# Case 2: a sheared, triclinic cell
# ---------------------------------------------------------------------------


def shear_matrix(tilt: tuple[float, float, float]) -> np.ndarray:
    """T (3, 3) with T H = rows (a, b + t_ba a, c + t_ca a + t_cb b) for tilt = (t_ba, t_ca, t_cb)."""
    t_ba, t_ca, t_cb = (float(t) for t in tilt)
    return np.array([[1.0, 0.0, 0.0], [t_ba, 1.0, 0.0], [t_ca, t_cb, 1.0]])


def sheared(frames: Frames, tilt=(0.2, 0.1, 0.1)) -> Geometry:
    """Case 2: H' = T H and x' = x H^-1 T H (det T = 1: the volume is kept).

    The map also squeezes bonds, by up to the smallest singular value of T
    (0.90 for the default tilt, 0.86 for (0.3, 0.2, 0.1), which brings some
    O-H pairs of the water data below 0.8 A).
    """
    H = _need_cells(frames, "the sheared case")
    T = shear_matrix(tilt)
    # (nf, 3, 3)
    H_new = T @ H
    # (nf, natoms, 3)  fractional coordinates s = x H^-1, solved rather than inverted
    s = np.linalg.solve(np.transpose(H, (0, 2, 1)), np.transpose(frames.coords, (0, 2, 1))).transpose(0, 2, 1)
    # (nf, natoms, 3)
    x_new = s @ H_new
    title = f"sheared triclinic cell: rows a, b + {tilt[0]} a, c + {tilt[1]} a + {tilt[2]} b, coordinates mapped alike"
    return Geometry("2-sheared", title, (Frames(x_new, H_new, frames.atom_types),), ("sheared frames",))


# ---------------------------------------------------------------------------
# Case 3: a cell shorter than 2 rcut
# ---------------------------------------------------------------------------


def close_pairs(x: np.ndarray, cell: np.ndarray | None, types: np.ndarray, min_dist: float) -> np.ndarray:
    """(npairs, 2) atoms i < j nearer than min_dist (any images), from minidp's neighbour list."""
    nloc = x.shape[0]
    nl = build_neighbor_list(x[None], None if cell is None else cell[None], types, min_dist,
                             [nloc] * (int(types.max()) + 1))
    # (npairs_found,) centre i, slot k, neighbour j; each pair is found from both ends
    i, k = np.nonzero(nl.nlist[0] >= 0)
    j = nl.nlist[0][i, k]
    return np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0).reshape(-1, 2)


def drop_close_atoms(x: np.ndarray, cell: np.ndarray, types: np.ndarray, min_dist: float) -> np.ndarray:
    """Indices of the atoms kept after removing, one by one, the atom in most pairs closer than min_dist."""
    # (nkept,)
    keep = np.arange(x.shape[0])
    while keep.size > 1:
        pairs = close_pairs(x[keep], cell, types[keep], min_dist)
        if pairs.size == 0:
            break
        # (nkept,) close pairs each kept atom is in
        counts = np.bincount(pairs.ravel(), minlength=keep.size)
        # the last of the most-involved atoms: deterministic, whatever the order of pairs
        worst = keep.size - 1 - int(np.argmax(counts[::-1]))
        keep = np.delete(keep, worst)
    return keep


def environment(x: np.ndarray, cell: np.ndarray | None, types: np.ndarray, rcut: float, sel) -> tuple[float, np.ndarray]:
    """One frame: the closest pair within rcut (inf if none), and (ntypes,) the most neighbours
    of each type that any atom has, counted up to 4 sel (the list keeps the nearest, so the closest
    pair is always in it)."""
    wide = [4 * int(s) for s in sel]
    sec = np.concatenate([[0], np.cumsum(wide)])
    with warnings.catch_warnings():
        # more than 4 sel only caps the count, which the caller sees
        warnings.simplefilter("ignore", UserWarning)
        nl = build_neighbor_list(x[None], None if cell is None else cell[None], types, rcut, wide)
    # (natoms, 4 nnei) slots holding a neighbour
    real = nl.nlist[0] >= 0
    closest = float(np.linalg.norm(nl.rij[0][real], axis=-1).min()) if real.any() else np.inf
    return closest, np.array([real[:, sec[t]:sec[t + 1]].sum(axis=1).max(initial=0) for t in range(len(sel))])


def thin_to_sel(x: np.ndarray, cell: np.ndarray, types: np.ndarray, rcut: float, sel) -> np.ndarray:
    """Indices of the atoms kept after removing, one by one, the last atom of the type most over sel.

    In a cell shorter than rcut every atom counts many images of each atom,
    so a frame slightly denser than average overflows sel; thinning it keeps
    the comparison free of truncated neighbour lists.
    """
    # (nkept,)
    keep = np.arange(x.shape[0])
    while keep.size > 1:
        # (ntypes,)
        over = environment(x[keep], cell, types[keep], rcut, sel)[1] - np.array(sel)
        if over.max() <= 0:
            break
        of_type = np.flatnonzero(types[keep] == int(np.argmax(over)))
        keep = np.delete(keep, of_type[-1])
    return keep


def small_cell(frames: Frames, edge: float = 7.5, min_dist: float = 0.8, fit: tuple | None = None,
               key: str = "3-small-cell", title: str | None = None) -> Geometry:
    """Case 3: per frame, the corner s H of the cell (s = edge / narrowest width) as a periodic system of its own.

    fit = (rcut, sel): also thin each frame until no atom has more neighbours than sel.
    """
    H = _need_cells(frames, "the small-cell case")
    groups, labels = [], []
    for f in range(H.shape[0]):
        # (natoms, 3) in [0, 1)
        _, frac = wrap(frames.coords[f], H[f])
        # (3,) perpendicular widths V / |a_l x a_m|
        widths = abs(np.linalg.det(H[f])) / np.linalg.norm(np.cross(H[f][[1, 2, 0]], H[f][[2, 0, 1]]), axis=1)
        scale = min(1.0, edge / widths.min())
        # (nin,) atoms in the corner
        inside = np.flatnonzero((frac < scale).all(axis=1))
        # atoms near the new faces meet atoms from the opposite faces, which
        # were never their neighbours: drop those that would overlap
        # (nin, 3), (3, 3), (nin,)
        x, cell, types = frac[inside] @ H[f], scale * H[f], frames.atom_types[inside]
        # (nkept,)
        kept = drop_close_atoms(x, cell, types, min_dist)
        if fit is not None:
            kept = kept[thin_to_sel(x[kept], cell, types[kept], *fit)]
        groups.append(Frames(x[kept][None], cell[None], types[kept]))
        labels.append(f"frame {f}")
    title = title or f"cell shorter than 2 rcut: the corner of each frame's cell, edge {edge:g} A, as a periodic system"
    return Geometry(key, title, tuple(groups), tuple(labels))


# ---------------------------------------------------------------------------
# Cases 4 and 6: open boundaries
# ---------------------------------------------------------------------------


def cluster(frames: Frames, radius: float = 5.0) -> Geometry:
    """Case 4: per frame, the atoms within radius of the cell's centre (nearest images), cells=None.

    Each kept atom is placed at its image nearest the centre, so no two kept
    atoms come closer than they are in the periodic frame.
    """
    groups, labels = [], []
    for f in range(frames.coords.shape[0]):
        x = frames.coords[f]
        if frames.cells is None:
            centre = x.mean(axis=0)
            # (natoms, 3)
            d = x - centre
        else:
            H = frames.cells[f]
            centre = H.sum(axis=0) / 2
            # (natoms, 3)  fractional offsets from the centre, to the nearest image
            s = np.linalg.solve(H.T, (x - centre).T).T
            d = (s - np.round(s)) @ H
        # (nin,)
        inside = np.flatnonzero(np.linalg.norm(d, axis=1) < radius)
        groups.append(Frames((centre + d[inside])[None], None, frames.atom_types[inside]))
        labels.append(f"frame {f}")
    return Geometry("4-cluster", f"open-boundary cluster: atoms within {radius:g} A of the centre, cells=None",
                    tuple(groups), tuple(labels))


def lone_atoms(ntypes: int, rcut: float) -> Geometry:
    """Case 6: one atom of each type with cells=None, and a type-0 atom alone in a cubic cell of edge 2.5 rcut."""
    groups = [Frames(np.zeros((1, 1, 3)), None, np.array([t])) for t in range(ntypes)]
    labels = [f"type {t} atom, cells=None" for t in range(ntypes)]
    edge = 2.5 * rcut
    groups.append(Frames(np.full((1, 1, 3), edge / 3), (edge * np.eye(3))[None], np.array([0])))
    labels.append(f"type 0 atom in a {edge:g} A cubic cell")
    return Geometry("6-lone-atom", "a lone atom with no neighbours (open and periodic)", tuple(groups), tuple(labels))


def combined(key: str, title: str, geometries: list[Geometry]) -> Geometry:
    """All groups of several geometries as one case (labels prefixed by the geometry's key)."""
    groups = tuple(g for geo in geometries for g in geo.groups)
    labels = tuple(f"{geo.key}: {label}" for geo in geometries for label in geo.labels)
    return Geometry(key, title, groups, labels)


# ---------------------------------------------------------------------------
# What a geometry looks like to a model: closest pair and neighbour counts
# ---------------------------------------------------------------------------


def neighbour_stats(geometry: Geometry, rcut: float, sel) -> dict:
    """Closest pair within rcut (inf if none) and the most neighbours of each type any atom has.

    Counts are exact up to 4 sel (counts_capped says if reached); the
    closest pair is always found, since the lists keep the nearest.
    """
    closest, most = np.inf, np.zeros(len(sel), dtype=int)
    for g in geometry.groups:
        for f in range(g.coords.shape[0]):
            cell = None if g.cells is None else g.cells[f]
            near, counts = environment(g.coords[f], cell, g.atom_types, rcut, sel)
            closest, most = min(closest, near), np.maximum(most, counts)
    sel = np.array([int(s) for s in sel])
    return {"min_distance": closest, "max_neighbours": most.tolist(), "sel": sel.tolist(),
            "sel_exceeded": bool((most > sel).any()), "counts_capped": bool((most >= 4 * sel).any())}


# ---------------------------------------------------------------------------
# Case 5: a type_one_side: false model with random weights, via deepmd-kit
# ---------------------------------------------------------------------------


def random_model_config(type_map: list[str], rcut: float, sel, seed: int) -> dict:
    """deepmd-kit model config: se_e2_a with type_one_side false, small nets, float64.

    ``fitting_net.type`` is spelled out: the .pb stores this dict as its
    training script, and deepmd-kit's TF reader needs the type to rebuild it.
    """
    return {
        "type_map": list(type_map),
        "descriptor": {"type": "se_e2_a", "sel": [int(s) for s in sel], "rcut": float(rcut),
                       "rcut_smth": float(min(1.0, rcut / 2)), "neuron": [8, 16, 32], "axis_neuron": 6,
                       "type_one_side": False, "resnet_dt": False, "precision": "float64", "seed": seed},
        "fitting_net": {"type": "ener", "neuron": [32, 32], "resnet_dt": True, "precision": "float64",
                        "seed": seed + 1},
    }


def set_statistics(model_dict: dict, sel, rng: np.random.Generator) -> dict:
    """Give davg, dstd, bias_atom_e and out_bias values far from their defaults (0, 1, 0, 0), in place.

    davg is non-zero in all four columns: padded slots then feed
    (0 - davg) / dstd != 0 to the nets, which minidp treats apart. davg and
    dstd vary with centre type, neighbour type and column but not from slot
    to slot within a neighbour type's section, like deepmd-kit's own
    statistics (one value per centre type and column). Why it matters:
    deepmd-kit's TF op sorts neighbours by r^2 in float32 (ties by index),
    minidp by r in float64, so two neighbours closer than float32 resolves
    can sit in swapped slots; with per-slot statistics that changed D by
    2.3e-4 (data_3 frame 5, O atom 48: H atoms 71 and 183, 1.0e-8 A apart).
    out_std stays 1: deepmd-kit's TF graph multiplies atomic energies by it,
    its NumPy backend and minidp do not, so any other value would test that
    difference and not minidp.
    """
    v = model_dict["descriptor"]["@variables"]
    ntypes = np.shape(v["davg"])[0]
    # (ntypes, ntypes, 4): per centre type, neighbour type, column
    davg = rng.uniform(-0.1, 0.3, (ntypes, len(sel), 4))
    dstd = rng.uniform(0.5, 2.0, (ntypes, len(sel), 4))
    section = np.repeat(np.arange(len(sel)), sel)
    v["davg"], v["dstd"] = davg[:, section], dstd[:, section]
    fit = model_dict["fitting"]["@variables"]
    fit["bias_atom_e"] = rng.normal(0.0, 1.0, np.shape(fit["bias_atom_e"]))
    out = model_dict["@variables"]
    out["out_bias"] = rng.normal(0.0, 1.0, np.shape(out["out_bias"]))
    return model_dict


def dp_executable() -> str:
    """deepmd-kit's `dp`, from the running Python's environment when it is there."""
    beside = Path(sys.executable).parent / "dp"
    return str(beside) if beside.exists() else "dp"


def write_random_model(dp_path, pb_path, config: dict, seed: int) -> dict:
    """Build the model with deepmd-kit's NumPy backend, save it as .dp, convert it to .pb with `dp convert-backend`.

    Returns the serialized model dict (with the statistics set). Both files
    are written under temporary names and moved into place when complete.
    """
    from deepmd.dpmodel.model.model import get_model
    from deepmd.dpmodel.utils.serialization import save_dp_model

    sel = config["descriptor"]["sel"]
    model_dict = set_statistics(get_model(copy.deepcopy(config)).serialize(), sel, np.random.default_rng(seed))
    with atomic_path(dp_path) as tmp:
        # the wrapper dp convert-backend reads: the model, and the config the
        # TF backend rebuilds its graph from
        save_dp_model(str(tmp), {"model": model_dict, "model_def_script": config})
    with atomic_path(pb_path) as tmp:
        run = subprocess.run([dp_executable(), "convert-backend", str(dp_path), str(tmp)],
                             capture_output=True, text=True)
        if run.returncode != 0 or not tmp.exists():
            tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"dp convert-backend {dp_path} {pb_path} failed (exit {run.returncode}):\n{tail}")
    return model_dict
