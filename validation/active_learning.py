"""minidp's active-learning commands against deepmd-kit's: model-devi, neighbor-stat, change-bias.

    python -m validation.active_learning                       # out/active-learning, ../shared beside the clone
    python -m validation.active_learning --out DIR --frames 20

- ``model-devi``: an ensemble of 4 models, the water model and 3 copies whose
  embedding and fitting weights are perturbed (relative noise 2%, seeds 1..3),
  saved as .dp by minidp and converted to .pb by ``dp convert-backend``.
  ``minidp model-devi`` (.dp) and ``dp model-devi`` (.pb) run on the same
  systems with each option (none, --atomic, --relative 1.0, --real_error,
  --real_error --relative 1.0); every column of both files is compared
  (--relative_v is left out: deepmd-kit 3.2's Python fails on it).
- ``neighbor-stat``: ``minidp neighbor-stat`` against ``dp neighbor-stat``,
  smallest distance and largest counts per type.
- ``change-bias``: ``minidp change-bias`` against ``dp --tf change-bias`` on
  the same model (a TensorFlow checkpoint trained 1 step, frozen for minidp:
  deepmd-kit's TensorFlow change-bias takes checkpoints only, and its
  PyTorch backend does not load beside torch 2.13) and data, modes change
  and set and -b; the new biases are compared.

Writes summary.json and summary.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
OPTIONS = {"plain": [], "atomic": ["--atomic"], "relative": ["--relative", "1.0"],
           "real_error": ["--real_error"], "real_error+relative": ["--real_error", "--relative", "1.0"]}


def perturbed_model(path, seed: int, scale: float = 0.02):
    """The model at ``path`` with every weight matrix and bias multiplied by (1 + scale * N(0, 1)), entrywise."""
    from minidp.io.serialization import load_model

    model = load_model(path)
    rng = np.random.default_rng(seed)
    nets = [net for row in model.descriptor.nets for net in row if net is not None] + list(model.fitting)
    for net in {id(n): n for n in nets}.values():
        for layer in net.layers:
            layer.W = layer.W * (1 + scale * rng.standard_normal(layer.W.shape))
            layer.b = layer.b * (1 + scale * rng.standard_normal(layer.b.shape))
    return model


def make_ensemble(work: Path, base=None, n: int = 4) -> tuple[list[Path], list[Path]]:
    """n models (.dp) and their .pb twins in ``work``: the base model and n - 1 perturbed copies (cached)."""
    from minidp.io.serialization import load_model, save_model

    base = Path(base or SHARED / "models" / "water-14000.dp")
    work.mkdir(parents=True, exist_ok=True)
    dps, pbs = [], []
    for k in range(n):
        dp, pb = work / f"graph.{k:03d}.dp", work / f"graph.{k:03d}.pb"
        if not dp.exists():
            save_model(dp, perturbed_model(base, k) if k else load_model(base))
        if not pb.exists():
            subprocess.run(["dp", "convert-backend", str(dp), str(pb)], check=True, capture_output=True)
        dps.append(dp)
        pbs.append(pb)
    return dps, pbs


def read_model_devi(path: Path) -> list[tuple[str, np.ndarray]]:
    """(system, rows) per block of a model_devi.out; rows (nf, 8 [+ natoms]) with the step first."""
    blocks, name, rows = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("# step"):
            continue
        if line.startswith("#"):
            if name is not None:
                blocks.append((name, np.array(rows)))
            name, rows = line[1:].strip(), []
        elif line.strip():
            rows.append([float(x) for x in line.split()])
    if name is not None:
        blocks.append((name, np.array(rows)))
    return blocks


def compare_model_devi(work: Path, systems: list[str], env: dict) -> dict:
    """Run both programs with each option on the same systems; the largest difference per column."""
    from minidp.active.model_devi import COLUMNS

    dps, pbs = make_ensemble(work / "models")
    out = {}
    for name, extra in OPTIONS.items():
        ours, theirs = work / f"minidp-{name}.out", work / f"dp-{name}.out"
        for f in (ours, theirs):
            f.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "minidp", "model-devi", "-m", *map(str, dps), "-s", *systems,
                        "-o", str(ours), *extra], check=True, capture_output=True, env=env)
        for s in systems:  # dp takes one -s; its blocks are appended
            subprocess.run(["dp", "model-devi", "-m", *map(str, pbs), "-s", s, "-o", str(theirs), *extra],
                           check=True, capture_output=True, env=env)
        a, b = read_model_devi(ours), read_model_devi(theirs)
        assert [n for n, _ in a] == [n for n, _ in b], (name, [n for n, _ in a], [n for n, _ in b])
        A, B = np.concatenate([r for _, r in a]), np.concatenate([r for _, r in b])
        cols = ["step", *COLUMNS] + (["atm_devi_f"] if A.shape[1] > 8 else [])
        diff = np.abs(A - B).max(axis=0)
        out[name] = {c: float(diff[i] if i < 8 else diff[8:].max()) for i, c in enumerate(cols)}
        out[name]["text_identical"] = ours.read_text() == theirs.read_text()
    return out


def compare_model_devi_arrays(dps: list[Path], pbs: list[Path], system: str) -> dict:
    """The columns as numbers (not printed): deepmd-kit's calc_model_devi on the .pb models against
    minidp's Ensemble on the .dp models, per option; the largest absolute difference per column."""
    from deepmd.infer import DeepPot as DeepmdPot
    from deepmd.infer.model_devi import calc_model_devi

    from minidp.active.model_devi import COLUMNS, Ensemble
    from minidp.io.systems import lazy_system, read_frames

    lazy = lazy_system(system)
    block = read_frames(lazy, 0, lazy.nframes)
    nf, natoms = block.coords.shape[:2]
    coords, cells, types = block.coords.reshape(nf, -1), block.cells.reshape(nf, 9), lazy.atom_types
    # the water systems have no virial labels: deepmd-kit reads them as zeros
    labels = {"energy": block.labels["energy"], "force": block.labels["force"], "virial": np.zeros((nf, 9))}
    real_data = {"energy": labels["energy"][:, None] / natoms, "force": labels["force"],
                 "virial": labels["virial"] / natoms}
    theirs_models, ours_models = [DeepmdPot(str(p)) for p in pbs], Ensemble(dps)
    out = {}
    for name, real, relative in (("atomic", False, None), ("atomic+relative", False, 1.0),
                                 ("atomic+real_error", True, None), ("atomic+real_error+relative", True, 1.0)):
        theirs = calc_model_devi(coords, cells, types, theirs_models, atomic=True, relative=relative,
                                 real_data=real_data if real else None)
        ours = ours_models.eval(coords, cells, types, atomic=True, relative=relative, real=labels if real else None)
        diff = np.abs(ours.devi - theirs[:, 1:])
        out[name] = {c: float(diff[:, i].max()) for i, c in enumerate(COLUMNS)}
        out[name]["atm_devi_f"] = float(diff[:, 7:].max())
        out[name]["largest value"] = float(np.abs(theirs[:, 1:]).max())
    return out


def tf_checkpoint(work: Path, systems: list[str], env: dict) -> Path:
    """A deepmd-kit TensorFlow checkpoint (dp change-bias changes checkpoints, not .pb files): the shared
    water input trained for 1 step on ``systems``, and its frozen model.pb (cached)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model.pb").exists():
        d = json.loads((SHARED / "models" / "input.json").read_text())
        tr = d["training"]
        tr["training_data"]["systems"] = list(systems)
        tr["validation_data"]["systems"] = list(systems[:1])
        tr.update(numb_steps=1, disp_freq=1, save_freq=1)
        (work / "input.json").write_text(json.dumps(d, indent=1))
        subprocess.run(["dp", "--tf", "train", "input.json"], cwd=work, env=env, check=True, capture_output=True)
        subprocess.run(["dp", "--tf", "freeze", "-o", "model.pb"], cwd=work, env=env, check=True, capture_output=True)
    return work / "model.pb"


def compare_change_bias(work: Path, systems: list[str], env: dict) -> dict:
    """minidp change-bias (on the frozen model) against dp --tf change-bias (on its checkpoint): the new
    bias per type, for modes change and set and for -b."""
    from minidp.io.serialization import load_model

    pb = tf_checkpoint(work, systems, env)
    out = {}
    for name, args in (("change", ["-m", "change"]), ("set", ["-m", "set"]), ("-b", ["-b", "-93.5", "-187.25"])):
        data = ["-s", *systems] if name != "-b" else []
        ours, theirs = work / f"minidp-{name}.dp", work / f"dp-{name}.pb"
        subprocess.run([sys.executable, "-m", "minidp", "change-bias", str(pb), *args, *data, "-o", str(ours)],
                       check=True, capture_output=True, env=env)
        # dp takes one -s folder and searches it for systems
        data = ["-s", str(Path(systems[0]).parent)] if name != "-b" else []
        # with -b (exclusive with -s) deepmd-kit still loads the systems of its default -s "."
        subprocess.run(["dp", "--tf", "change-bias", str(work / "model.ckpt"), *args, *data, "-o", str(theirs)],
                       cwd=Path(systems[0]).parent, check=True, capture_output=True, env=env)
        out[name] = {"max_abs_diff_energy": _energy_difference(ours, theirs, systems[0])}
        try:
            a, b = load_model(ours).bias, load_model(theirs).bias
        except ValueError as err:  # dp's -b output lacks tensors of a frozen model; its energies still run
            out[name]["bias"] = f"not readable by minidp: {err}"[:200]
            continue
        out[name].update({"minidp": a.tolist(), "deepmd-kit": b.tolist(), "max_abs_diff": float(np.abs(a - b).max())})
    return out


def _energy_difference(ours: Path, theirs: Path, system: str) -> float:
    """max |E_minidp - E_deepmd-kit| (eV) of the two changed models on the system's frames."""
    from deepmd.infer import DeepPot as DeepmdPot

    from minidp.infer import DeepPot
    from minidp.io.systems import lazy_system, read_frames

    lazy = lazy_system(system)
    block = read_frames(lazy, 0, lazy.nframes)
    nf = block.coords.shape[0]
    args = (block.coords.reshape(nf, -1), block.cells.reshape(nf, 9), lazy.atom_types)
    return float(np.abs(DeepPot(ours).eval(*args)[0] - DeepmdPot(str(theirs)).eval(*args)[0]).max())


def compare_neighbor_stat(water: Path, rcut: float = 6.0) -> dict:
    """minidp's neighbor_stat against deepmd-kit's (the function behind dp neighbor-stat, TensorFlow
    backend) on every frame of the water systems: the distance as a number, the counts."""
    from deepmd.entrypoints.neighbor_stat import neighbor_stat as deepmd_neighbor_stat

    from minidp.active.model_devi import expand_systems
    from minidp.active.neighbor_stat import neighbor_stat

    d_theirs, n_theirs = deepmd_neighbor_stat(system=str(water), rcut=rcut, type_map=["O", "H"])
    ours = neighbor_stat(expand_systems([water]), rcut, ["O", "H"], progress=False)
    return {"min_nbor_dist": {"minidp": ours.min_nbor_dist, "deepmd-kit": float(d_theirs),
                              "abs_diff": abs(ours.min_nbor_dist - float(d_theirs))},
            "max_nbor_size": {"minidp": ours.max_nbor_size, "deepmd-kit": [int(n) for n in n_theirs],
                              "equal": ours.max_nbor_size == [int(n) for n in n_theirs]}}


def small_systems(work: Path, water: Path, frames: int) -> list[str]:
    """The first ``frames`` frames of data_0 and data_3, as deepmd/npy systems in work/systems (cached)."""
    out = []
    for name in ("data_0", "data_3"):
        target = work / "systems" / name
        if not (target / "type.raw").exists():
            (target / "set.000").mkdir(parents=True, exist_ok=True)
            for f in ("type.raw", "type_map.raw"):
                (target / f).write_text((water / name / f).read_text())
            for f in (water / name / "set.000").glob("*.npy"):
                np.save(target / "set.000" / f.name, np.load(f)[:frames])
        out.append(str(target))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/active-learning", help="output folder")
    p.add_argument("--shared", default=str(SHARED), help="the shared data folder")
    p.add_argument("--frames", type=int, default=10, help="frames of data_0 and data_3 to use")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    water = Path(args.shared) / "data" / "water"
    systems = small_systems(out, water, args.frames)
    summary = {"model-devi (files)": compare_model_devi(out, systems, env)}
    dps, pbs = make_ensemble(out / "models")
    summary["model-devi (numbers)"] = compare_model_devi_arrays(dps, pbs, systems[0])
    summary["change-bias"] = compare_change_bias(out / "change-bias", systems, env)
    summary["neighbor-stat"] = compare_neighbor_stat(water)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
