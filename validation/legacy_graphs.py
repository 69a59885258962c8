"""deepmd-kit's old TensorFlow graphs (no training script) in minidp, against deepmd-kit's own numbers.

    python -m validation.legacy_graphs FOLDER [--tol 1e-10]

FOLDER holds deepmd-kit's test fixtures ``deeppot.pbtxt``, ``deeppot-1.pbtxt``, ``sea_012.pbtxt`` and
``se_e2_a_tebd.pbtxt`` (se_e2_a with a type embedding, which has a training script but which deepmd-kit's
converter refuses: minidp reads it from its constants too)
(``source/tests/infer`` in its repository; they are not copied here). In a temporary folder each is
written as a binary ``.pb``, and ``sea_012`` also through ``dp convert-from 0.12`` (deepmd-kit's TF
``DeepPot`` runs only the converted graph; minidp reads both). minidp loads the ``.pb`` with
:func:`minidp.io.serialization.load_model` (which hands a graph without a training script to
:mod:`minidp.io.legacy_graph`) and evaluates the frame of deepmd-kit's tests (six atoms, O H H O H H) in
a 13 Å cube (``pbc13``), without a cell (``nopbc``) and in a 19 x 13 x 13 box (``box19``). Compared:

- with the reference values quoted from deepmd-kit's tests (``REFERENCE``: energies; atomic energies,
  forces and virial where the tests give them);
- with deepmd-kit's TF ``DeepPot`` run in a separate process on the same ``.pb``: energy, forces, virial,
  atomic energies and atomic virials.

Prints a table of max |minidp - reference| per quantity; exits 1 if any exceeds --tol, 2 on bad input.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from minidp.infer import DeepPot
from minidp.io.legacy_graph import read_graph_def
from validation.cases import dp_executable

FIXTURES = ("deeppot", "deeppot-1", "sea_012", "se_e2_a_tebd")
QUANTITIES = ("e", "f", "v", "ae", "av")

# the frame of deepmd-kit's DeepPot tests, (1, 6, 3), types O H H O H H
COORDS = np.array([12.83, 2.56, 2.18, 12.09, 2.87, 2.74, 0.25, 3.32, 1.68,
                   3.36, 3.00, 1.81, 3.51, 2.51, 2.60, 4.27, 3.22, 1.56]).reshape(1, 6, 3)
TYPES = np.array([0, 1, 1, 0, 1, 1])
# (1, 9) cells, or None
CELLS = {"pbc13": np.diag([13.0, 13.0, 13.0]).reshape(1, 9), "nopbc": None,
         "box19": np.diag([19.0, 13.0, 13.0]).reshape(1, 9)}

# deepmd-kit's reference values. deeppot: its tests (source/lmp/tests/test_lammps.py expected_ae, expected_f,
# and the virial summed from its atomic virials; v2.2.9 source/tests/test_deeppot_a.py has the same and the
# energies). deeppot-1, sea_012 and se_e2_a_tebd: deepmd-kit 3.2's TF DeepPot (research22 section 4.4;
# se_e2_a_tebd's to 15 digits, computed for this table; deeppot-1's forces are test_lammps.py expected_f2). nopbc and box19 share the energy: no atom sees an image across a 19 Å or
# 13 Å cell. The test files quote 12 to 16 digits, hence differences of ~1e-13 at ~930 eV.
REFERENCE = {
    ("deeppot", "pbc13"): {
        "e": -930.969183478773,
        "ae": [-9.275780747115504710e01, -1.863501786584258468e02, -1.863392472863538103e02,
               -9.279281325486221021e01, -1.863671545232153903e02, -1.863619822847602165e02],
        "f": [-3.034045420701179663e-01, 8.405844663871177014e-01, 7.696947487118485642e-02,
              7.662001266663505117e-01, -1.880601391333554251e-01, -6.183333871091722944e-01,
              -5.036172391059643427e-01, -6.529525836149027151e-01, 5.432962643022043459e-01,
              6.382357912332115024e-01, -1.748518296794561167e-01, 3.457363524891907125e-01,
              1.286482986991941552e-03, 3.757251165286925043e-01, -5.972588700887541124e-01,
              -5.987006197104716154e-01, -2.004450304880958100e-01, 2.495901655353461868e-01],
        "v": [-1.1790314852267323, -0.2596100474696119, 0.8164681548048793, -0.2596100474696118,
              -0.7825573876862044, 0.5679382587188416, 0.8164681548048791, 0.5679382587188416,
              -1.1514319074224304],
    },
    ("deeppot", "nopbc"): {"e": -930.135831631939},
    ("deeppot", "box19"): {"e": -930.135831631939},
    ("deeppot-1", "pbc13"): {
        "e": -931.116717943713,
        "ae": [-92.74410949630, -186.3691737695, -186.3444076960, -92.82466699242, -186.4276134920,
               -186.4067464975],
        "f": [-0.64549489891, 1.7245778324, 0.18897958046, 1.6893651416, -0.36995298824, -1.3604446413,
              -1.0990269250, -1.3548792804, 1.1741670180, 1.6842611099, -0.50835585321, 0.98340414904,
              0.057717575295, 1.1251581824, -1.7756153132, -1.6868220029, -0.61654789288, 0.78950920695],
        "v": [-3.0433688113, -0.68667078143, 1.9424523546, -0.68667078143, -1.8312497733, 1.5131837627,
              1.9424523546, 1.5131837627, -2.9480461831],
    },
    ("deeppot-1", "nopbc"): {"e": -930.093555992783},
    ("deeppot-1", "box19"): {"e": -930.093555992783},
    ("sea_012", "pbc13"): {
        "e": -935.853060468408,
        "ae": [-93.65188156416, -187.1184930214, -187.1210805318, -93.62950729253, -187.1610539868,
               -187.1710440717],
        "f": [0.68545273195, -0.26542261512, -0.50775186544, -0.075427385575, 0.50092017838, -0.027009990963,
              -0.58169714984, -0.23486158513, 0.53334205440, -0.41030201642, 0.70622550447, -1.1561404493,
              0.45670282690, -0.52190822775, 0.87344030164, -0.074729007018, -0.18495325485, 0.28411994969],
        "v": [-0.28799304373, -0.71816149661, 0.63856815672, -0.71816149661, 0.19155593575, 0.032112218156,
              0.63856815672, 0.032112218156, 0.33666590199],
    },
    ("sea_012", "nopbc"): {"e": -935.053623343329},
    ("sea_012", "box19"): {"e": -935.053623343329},
    ("se_e2_a_tebd", "pbc13"): {
        "e": -938.8090552161314,
        "ae": [-94.4945526073895, -187.330527191752, -187.65849670836, -94.4474597176218, -187.511958354867,
              -187.366060636141],
        "f": [-0.178793681311056, 0.499483023293555, 0.12548773377497, 0.272770906934679, -0.233309850113633,
              -0.21024562325965, 0.476757478561427, -0.359459431371978, 0.18929927979092, -0.0477456957492672,
              0.0827762645962091, -0.108352221576183, -0.483119767905612, -0.0831420195711712, 0.152206190474556,
              -0.03986924053017, 0.0936520131670179, -0.148395359204613],
        "v": [-2.12505480997738, 0.423728848372126, -0.246152497361716, 0.423728848372126, -0.243126235286807,
              -0.0745349146616855, -0.246152497361717, -0.0745349146616857, -0.0163651442315022],
    },
    ("se_e2_a_tebd", "nopbc"): {"e": -935.3374994312513},
    ("se_e2_a_tebd", "box19"): {"e": -935.3374994312513},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.legacy_graphs", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, nargs="?", help="folder holding deeppot.pbtxt, deeppot-1.pbtxt, sea_012.pbtxt, "
                   "se_e2_a_tebd.pbtxt")
    p.add_argument("--tol", type=float, default=1e-10, help="largest absolute difference passed (default: %(default)g)")
    p.add_argument("--tf-worker", nargs=2, metavar=("PB", "NPZ"), help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------
# The two evaluations
# ---------------------------------------------------------------------------


def evaluate(pot) -> dict[str, dict[str, np.ndarray]]:
    """Per frame name: e (1,), f (6, 3), v (9,), ae (6,), av (6, 9) from either code's DeepPot."""
    out = {}
    for name, cells in CELLS.items():
        e, f, v, ae, av = pot.eval(COORDS.reshape(1, -1), cells, TYPES, atomic=True)
        out[name] = {"e": np.reshape(e, 1), "f": np.reshape(f, (6, 3)), "v": np.reshape(v, 9),
                     "ae": np.reshape(ae, 6), "av": np.reshape(av, (6, 9))}
    return out


def tf_worker(pb: str, npz: str) -> None:
    """Run in its own process: deepmd-kit's TF DeepPot on ``pb``, every result into ``npz``."""
    # deepmd-kit is the reference: imported in this worker process only
    from deepmd.infer import DeepPot as DeepmdPot

    results = evaluate(DeepmdPot(pb))
    np.savez(npz, **{f"{frame}/{q}": value for frame, r in results.items() for q, value in r.items()})


def tf_results(pb: Path) -> dict[str, dict[str, np.ndarray]]:
    """:func:`tf_worker` in a separate Python process (TensorFlow stays out of this one)."""
    npz = pb.with_suffix(".tf.npz")
    run = subprocess.run([sys.executable, "-m", "validation.legacy_graphs", "--tf-worker", str(pb), str(npz)],
                         check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"deepmd-kit's DeepPot failed on {pb} (exit {run.returncode}):\n{tail}")
    with np.load(npz) as data:
        return {frame: {q: data[f"{frame}/{q}"] for q in QUANTITIES} for frame in CELLS}


def minidp_results(pb: Path) -> dict[str, dict[str, np.ndarray]]:
    """minidp's DeepPot on ``pb`` (an old graph goes through minidp.io.legacy_graph)."""
    return evaluate(DeepPot(pb))


def write_pbs(folder: Path, tmp: Path) -> dict[str, tuple[Path, Path]]:
    """Per fixture: (the .pb minidp reads, the .pb deepmd-kit's DeepPot runs), written under ``tmp``."""
    pbs = {}
    for name in FIXTURES:
        src = folder / f"{name}.pbtxt"
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist; expected deepmd-kit's source/tests/infer/{name}.pbtxt")
        pb = tmp / f"{name}.pb"
        pb.write_bytes(read_graph_def(src).SerializeToString())
        pbs[name] = (pb, pb)
    # deepmd-kit's DeepPot needs a 0.12 graph renamed to its 2.1 ops and nodes first (writes into its cwd)
    converted = tmp / "sea_012-converted.pb"
    run = subprocess.run([dp_executable(), "convert-from", "0.12", "-i", str(pbs["sea_012"][0]), "-o",
                          str(converted)], check=False, capture_output=True, text=True, cwd=tmp)
    if run.returncode != 0 or not converted.is_file():
        raise RuntimeError(f"dp convert-from 0.12 failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    pbs["sea_012"] = (pbs["sea_012"][0], converted)
    pbs["sea_012 (converted)"] = (converted, converted)
    return pbs


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=float).reshape(-1) - np.asarray(b, dtype=float).reshape(-1))))


def rows(pbs: dict[str, tuple[Path, Path]]) -> list[tuple[str, str, str, dict[str, float]]]:
    """(fixture, frame, against, {quantity: max |minidp - it|}) for every comparison."""
    out = []
    for name, (ours_pb, tf_pb) in pbs.items():
        ours, theirs = minidp_results(ours_pb), tf_results(tf_pb)
        for frame in CELLS:
            ref = REFERENCE.get((name.split(" ")[0], frame), {})
            out.append((name, frame, "quoted references", {q: max_abs(ours[frame][q], ref[q]) for q in ref}))
            out.append((name, frame, "deepmd-kit TF DeepPot",
                        {q: max_abs(ours[frame][q], theirs[frame][q]) for q in QUANTITIES}))
    return out


def table(results, tol: float) -> str:
    head = ["fixture", "frame", "against"] + [f"max|d{q}|" for q in QUANTITIES] + ["pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, frame, against, diffs in results:
        cells = [f"{diffs[q]:.1e}" if q in diffs else "-" for q in QUANTITIES]
        ok = all(d <= tol for d in diffs.values())
        lines.append("| " + " | ".join([name, frame, against, *cells, "yes" if ok else "NO"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tf_worker:
        tf_worker(*args.tf_worker)
        return 0
    if args.folder is None or not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="minidp-legacy-graphs-") as tmp:
        try:
            pbs = write_pbs(args.folder, Path(tmp))
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results = rows(pbs)
    print(table(results, args.tol))
    worst = max(d for *_, diffs in results for d in diffs.values())
    print(f"\nlargest difference {worst:.2e} (tol {args.tol:g}): {'pass' if worst <= args.tol else 'FAIL'}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
