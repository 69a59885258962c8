"""The ``minidp`` command line.

Each subcommand is a small function ``_cmd_<name>(args) -> int``; ``main``
turns the known errors (bad input, missing files) into one line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _add_tutorial(sub) -> None:
    p = sub.add_parser("tutorial", help="re-run the experiments of the tutorial minidp grew from")
    tsub = p.add_subparsers(dest="experiment", required=True)
    # --- owned by the tutorial module: see minidp/tutorial.py ---
    from minidp import tutorial

    tutorial.add_subcommands(tsub)


def _cmd_eval(args) -> int:
    """Evaluate a system and write it, labelled with the model's energy, force and virial."""
    import dpdata

    from minidp.data import atomic_path, model_types, read_system
    from minidp.infer import DeepPot

    dp = DeepPot(args.model, batch_size=args.batch_size)
    system = read_system(args.system, args.format, args.type_map)
    types = model_types(system["atom_names"], system["atom_types"], dp.get_type_map())
    cells = None if system.nopbc else system["cells"]
    e, f, v = dp.eval(system["coords"], cells, types)
    data = {
        "atom_names": list(system["atom_names"]), "atom_numbs": list(system["atom_numbs"]),
        "atom_types": np.asarray(system["atom_types"]), "orig": np.zeros(3),
        "cells": system["cells"], "coords": system["coords"], "nopbc": system.nopbc,
        "energies": e[:, 0], "forces": f, "virials": v.reshape(-1, 3, 3),
    }
    labelled = dpdata.LabeledSystem(data=data)
    with atomic_path(args.output) as tmp:
        labelled.to("deepmd/npy", str(tmp), set_size=args.set_size)
    print(f"{len(e)} frames of {types.size} atoms -> {args.output} (energy, force, virial)")
    return 0


def _cmd_eval_desc(args) -> int:
    """Write each system's descriptors to OUT/<system name>.npy, shape (nframes, natoms, ng * m2)."""
    from pathlib import Path

    from minidp.data import atomic_path, model_types, read_system
    from minidp.infer import DeepPot

    dp = DeepPot(args.model, batch_size=args.batch_size)
    out = Path(args.output)
    for path in args.system:
        system = read_system(path, args.format, args.type_map)
        types = model_types(system["atom_names"], system["atom_types"], dp.get_type_map())
        D = dp.eval_descriptor(system["coords"], None if system.nopbc else system["cells"], types)
        target = out / f"{Path(path).resolve().name}.npy"
        with atomic_path(target) as tmp:
            np.save(tmp, D)
        print(f"{path}: descriptors {D.shape} -> {target}")
    return 0


def _cmd_test(args) -> int:
    """RMSE and MAE of the model against a labelled system's energies, forces and virials."""
    from pathlib import Path

    from minidp.data import model_types, read_system
    from minidp.infer import DeepPot
    from minidp.report import error_table, parity_plots

    dp = DeepPot(args.model, batch_size=args.batch_size)
    system = read_system(args.system, args.format, args.type_map)
    if "energies" not in system.data:
        raise ValueError(f"system {args.system} has no labels (energies) to test against")
    n = min(args.numb_test or len(system), len(system))
    types = model_types(system["atom_names"], system["atom_types"], dp.get_type_map())
    cells = None if system.nopbc else system["cells"][:n]
    e, f, v = dp.eval(system["coords"][:n], cells, types)
    labels = {"energy": system["energies"][:n], "force": system["forces"][:n]}
    if "virials" in system.data:
        labels["virial"] = system["virials"][:n].reshape(n, 9)
    predicted = {"energy": e[:, 0], "force": f, "virial": v}
    print(error_table(predicted, labels, types.size))
    if args.plots:
        for png in parity_plots(predicted, labels, types.size, Path(args.plots)):
            print(f"parity plot -> {png}")
    return 0


def _cmd_info(args) -> int:
    """Print what a model is: types, cutoff, neighbour selection, network sizes."""
    from minidp.serialization import load_model

    m = load_model(args.model)
    cfg = m.descriptor.config
    fit = m.fitting[0]
    print(f"model        {args.model}")
    print(f"type_map     {m.type_map}")
    print(f"descriptor   se_e2_a  rcut {cfg.rcut}  rcut_smth {cfg.rcut_smth}  sel {list(cfg.sel)}")
    print(f"embedding    neuron {list(cfg.neuron)}  axis_neuron {cfg.axis_neuron}  "
          f"type_one_side {cfg.type_one_side}  -> descriptor of {cfg.dim_out}")
    print(f"fitting      neuron {[layer.n_out for layer in fit.layers[:-1]]}  ({m.ntypes} nets)")
    print(f"parameters   {m.n_params():,}")
    print(f"precision    {fit.dtype}")
    c = m.descriptor.compress
    if c is None:
        print("compressed   no")
    else:
        t = c.tables[0]
        rmin = "unknown" if c.min_nbor_dist is None else f"{c.min_nbor_dist:.6g} A"
        print(f"compressed   yes: {len(c.tables)} tables of {t.nspline} pieces, step {t.stride0:g} in "
              f"[{t.lower:g}, {t.upper:g}), {t.stride1:g} to {t.table_max:g} (extrapolate "
              f"{t.table_max / t.upper:g}); smallest neighbour distance {rmin}")
    return 0


def _compress_min_nbor_dist(args, data: dict) -> tuple[float, str]:
    """The smallest neighbour distance for the grid, and where it came from: the model file,
    the training systems of -t, or --min-nbor-dist (in that order, as `dp compress` looks)."""
    from minidp.serialization import min_nbor_dist

    found = min_nbor_dist(data)
    if found is not None:
        return found, f"from {args.input}"
    if args.training_script is not None:
        from minidp.compress import systems_min_nbor_dist
        from minidp.train import load_systems, read_input

        config = read_input(args.training_script)
        systems = load_systems(config.training.systems, config.type_map)
        return systems_min_nbor_dist(systems, config.descriptor.rcut), f"from the training systems of {args.training_script}"
    if args.min_nbor_dist is not None:
        return args.min_nbor_dist, "given"
    raise ValueError(f"{args.input} carries no smallest neighbour distance: give the training input with "
                     "-t INPUT.json (its training systems are scanned) or the distance with --min-nbor-dist D")


def _cmd_compress(args) -> int:
    """Tabulate the embedding nets of a model (deepmd-kit's `dp compress`) and write it."""
    from dataclasses import replace

    from minidp.compress import compress_descriptor
    from minidp.serialization import model_from_dict, read_model_dict, save_model

    data = read_model_dict(args.input)
    model = model_from_dict(data)
    if model.descriptor.compress is not None:
        raise ValueError(f"{args.input} is already compressed")
    rmin, origin = _compress_min_nbor_dist(args, data)
    se = compress_descriptor(model.descriptor, rmin, args.step, args.extrapolate, args.frequency)
    save_model(args.output, replace(model, descriptor=se))
    t = se.compress.tables[0]
    print(f"smallest neighbour distance {rmin:.6g} A ({origin}); {len(se.compress.tables)} tables of "
          f"{t.nspline} pieces, s in [{t.lower:g}, {t.upper:g}) by {t.stride0:g}, then to {t.table_max:g} "
          f"by {t.stride1:g} -> {args.output}")
    return 0


def _add_compress(sub) -> None:
    from minidp.compress import (
        DEFAULT_CHECK_FREQUENCY,
        DEFAULT_EXTRAPOLATE,
        DEFAULT_STEP,
    )

    p = sub.add_parser("compress", help="tabulate the embedding nets, like `dp compress`")
    p.add_argument("-i", "--input", required=True, help="model to compress (.dp, .yaml, .json; .pb/.pth with deepmd-kit)")
    p.add_argument("-o", "--output", required=True, help="compressed model: .dp, .yaml or .json")
    p.add_argument("-s", "--step", type=float, default=DEFAULT_STEP,
                   help=f"stride of the first table; the second uses 10 * step (default: {DEFAULT_STEP})")
    p.add_argument("-e", "--extrapolate", type=float, default=DEFAULT_EXTRAPOLATE,
                   help=f"the second table runs to extrapolate * its start (default: {DEFAULT_EXTRAPOLATE:g})")
    p.add_argument("-f", "--frequency", type=int, default=DEFAULT_CHECK_FREQUENCY,
                   help="deepmd-kit's overflow-check frequency, stored in the tables (minidp never needs it; "
                        f"default: {DEFAULT_CHECK_FREQUENCY})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-t", "--training-script", default=None,
                       help="training input (JSON): the smallest neighbour distance of its training systems")
    where.add_argument("--min-nbor-dist", type=float, default=None, help="the smallest neighbour distance (A)")
    p.set_defaults(func=_cmd_compress)


def _cmd_train(args) -> int:
    """Train a model from deepmd-kit's input.json and write it in deepmd-kit's serialization."""
    from minidp.train import read_input, train

    config = read_input(args.input)
    if args.numb_steps is not None:
        from dataclasses import replace

        config = replace(config, numb_steps=args.numb_steps)
    result = train(config, args.output, args.workdir, args.restart, progress=not args.quiet)
    rows = [f"{s}: rmse_e {v.rmse_e:.3e} eV/atom  rmse_f {v.rmse_f:.3e} eV/A" for s, v in result.last.items()]
    print(f"trained {config.numb_steps} steps, {result.seconds_per_step:.4f} s/step; last line: " + "; ".join(rows))
    print(f"model written to {args.output}; learning curve in {args.workdir}/{config.disp_file} and lcurve.png")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an se_e2_a model from deepmd-kit's input.json")
    p.add_argument("input", help="deepmd-kit training input (JSON); systems relative to its folder")
    p.add_argument("-o", "--output", required=True, help="trained model: .dp, .yaml or .json (deepmd-kit's serialization)")
    p.add_argument("--restart", default=None, help="resume from a checkpoint (<save_ckpt>-<step>, its .dp or .npz)")
    p.add_argument("--workdir", default=".", help="folder for lcurve.out, checkpoints and lcurve.png (default: .)")
    p.add_argument("--numb-steps", type=int, default=None, help="override training/numb_steps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _model_and_system(sub, name: str, help: str, systems: str = "system (any format dpdata reads)",
                      many: bool = False):
    """A subcommand taking a model and a system, with the options every such command shares."""
    p = sub.add_parser(name, help=help)
    p.add_argument("-m", "--model", required=True, help="model file (.dp, .yaml, .json; .pb/.pth with deepmd-kit)")
    p.add_argument("-s", "--system", required=True, nargs="+" if many else None, help=systems)
    p.add_argument("-f", "--format", default=None, help="dpdata format (default: guessed)")
    p.add_argument("-t", "--type-map", nargs="+", default=None,
                   help="element of each numbered type, for formats without names (LAMMPS data/dump)")
    p.add_argument("--batch-size", type=int, default=None, help="atoms per chunk (default: from free memory)")
    return p


def _add_model_commands(sub) -> None:
    p = _model_and_system(sub, "eval", "evaluate a system and write it labelled (deepmd/npy)")
    p.add_argument("-o", "--output", required=True, help="output deepmd/npy folder")
    p.add_argument("--set-size", type=int, default=5000, help="frames per set.* folder")
    p.set_defaults(func=_cmd_eval)

    p = _model_and_system(sub, "eval-desc", "write descriptors to .npy, one file per system",
                          "systems (any format dpdata reads)", many=True)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=_cmd_eval_desc)

    p = _model_and_system(sub, "test", "RMSE/MAE against a labelled system, like `dp test`",
                          "labelled system (any format dpdata reads)")
    p.add_argument("-n", "--numb-test", type=int, default=0, help="frames to test (default: all)")
    p.add_argument("--plots", default=None, help="folder for parity plots (PNG)")
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model", help="model file")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_train(sub)
    _add_compress(sub)
    _add_tutorial(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"minidp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
