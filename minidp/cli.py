"""The ``minidp`` command line.

Each subcommand is a small function ``_cmd_<name>(args) -> int``; ``main``
turns the expected errors (bad input: ValueError, including
:class:`minidp.checks.InputError` and its TypeError twin; the file system:
OSError; a missing optional package: ImportError) into one line on stderr and
exit status 2, Ctrl-C into "interrupted" and 130. A plain TypeError is a bug
and keeps its traceback. Every output goes through
:func:`minidp.io.outputs.safe_output`: never onto a user's files, all or nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from minidp.checks import BACKENDS


def _add_tutorial(sub) -> None:
    p = sub.add_parser("tutorial", help="re-run the experiments of the tutorial minidp grew from")
    tsub = p.add_subparsers(dest="experiment", required=True)
    # --- owned by the tutorial module: see minidp/training/tutorial.py ---
    from minidp.training import tutorial as tutorial

    tutorial.add_subcommands(tsub)


def _cmd_eval(args) -> int:
    """Evaluate a system and write it, labelled with the model's energy, force and virial.

    A -s holding several systems (a folder of systems, an HDF5 file of groups,
    an extended XYZ file of several kinds of frame) writes OUT/<name> for each.
    """
    from minidp.active.stream import write_labelled
    from minidp.checks import positive_int
    from minidp.infer import DeepPot
    from minidp.io.outputs import check_output, safe_output
    from minidp.io.systems import frames_per_block, open_systems, output_names, system_file

    set_size = positive_int("--set-size", args.set_size)
    inputs = (system_file(args.system), args.model)
    check_output(args.output, "deepmd/npy", inputs, args.overwrite)  # refused before any work
    dp = DeepPot(args.model, batch_size=args.batch_size, backend=args.backend, progress=False)
    systems = open_systems(args.system, args.format, args.type_map, model_type_map=dp.get_type_map())
    names = output_names(args.system, systems)
    with safe_output(args.output, "deepmd/npy", inputs, args.overwrite) as tmp:
        for system, name in zip(systems, names):
            folder = tmp if len(systems) == 1 else tmp / name
            write_labelled(dp, system, folder, frames_per_block(system.natoms), set_size)
    for system, name in zip(systems, names):
        where = args.output if len(systems) == 1 else Path(args.output) / name
        print(f"{system.nframes} frames of {system.natoms} atoms -> {where} (energy, force, virial)")
    return 0


def _cmd_eval_desc(args) -> int:
    """Write each system's descriptors to OUT/<system name>.npy, shape (nframes, natoms, ng * m2).

    A -s holding several systems writes OUT/<its name>_<system>.npy for each.
    All of OUT is written at once, after the last system: a failure leaves no OUT.
    """
    from minidp.active.stream import descriptor_block
    from minidp.infer import DeepPot
    from minidp.io.outputs import check_output, safe_output
    from minidp.io.systems import (
        block_types,
        distinct_names,
        frames_per_block,
        iter_blocks,
        open_systems,
        output_names,
        select_params,
        system_file,
    )

    inputs = (*(system_file(s) for s in args.system), args.model)
    check_output(args.output, "descriptors", inputs, args.overwrite)
    dp = DeepPot(args.model, batch_size=args.batch_size, backend=args.backend, progress=False)
    systems, names = [], []
    for root in args.system:
        found = open_systems(root, args.format, args.type_map, model_type_map=dp.get_type_map())
        below = output_names(root, found)
        systems += [select_params(s, dp) for s in found]
        names += [f"{n}.npy" if len(found) == 1 else f"{Path(root).resolve().name}_{n}.npy" for n in below]
    distinct_names(names, systems)
    with safe_output(args.output, "descriptors", inputs, args.overwrite) as tmp:
        tmp.mkdir()
        for system, name in zip(systems, names):
            # (nframes, natoms, ng * m2), filled block by block
            D = np.lib.format.open_memmap(tmp / name, "w+", np.float64,
                                          (system.nframes, system.natoms, dp.get_dim_descriptor()))
            for block in iter_blocks(system, frames_per_block(system.natoms), labels=False):
                D[block.frames] = descriptor_block(dp, block, block_types(system, block, dp.get_type_map()))
            print(f"{system.name}: descriptors {D.shape} -> {args.output}/{name}")
            del D  # written and unmapped
    return 0


def _test_errors(dp, systems, numb_test: int) -> tuple[dict, dict, np.ndarray]:
    """Predicted and label energy (nf,), force (one row per real atom, 3) and virial (nf, 9) over the first
    numb_test frames (0: all) of each system, and each frame's number of atoms (nf,)."""
    from minidp.active.stream import predict_block
    from minidp.io.systems import block_types, frames_per_block, iter_blocks, select_params

    keys = [k for k in ("energy", "force", "virial") if all(k in s.labels for s in systems)]
    predicted, labels, natoms = {k: [] for k in keys}, {k: [] for k in keys}, []
    for system in [select_params(s, dp) for s in systems]:
        for block in iter_blocks(system, frames_per_block(system.natoms), numb_test or None):
            types = block_types(system, block, dp.get_type_map())
            p = predict_block(dp, block, types)
            # (nf, natoms): the real atoms (a padding atom of mixed data has type -1)
            real = np.broadcast_to(types >= 0, block.coords.shape[:2])
            natoms.append(real.sum(axis=1))
            for key, value in (("energy", p.energy), ("force", p.force[real]), ("virial", p.virial)):
                if key in keys:
                    predicted[key].append(value)
                    labels[key].append(block.labels[key][real] if key == "force" else block.labels[key])
    return ({k: np.concatenate(v) for k, v in predicted.items()}, {k: np.concatenate(v) for k, v in labels.items()},
            np.concatenate(natoms))


def _cmd_test(args) -> int:
    """RMSE and MAE of the model against a labelled system's energies, forces and virials.

    Over several systems (a -s holding several), the errors of all their frames
    together: dp test's weighted average.
    """
    from minidp.infer import DeepPot
    from minidp.io.figures import error_table, parity_plots
    from minidp.io.outputs import check_output, safe_output
    from minidp.io.systems import open_systems, system_file

    if args.numb_test < 0:
        raise ValueError(f"--numb-test must be a number of frames >= 0 (0: all), got {args.numb_test}")
    inputs = (system_file(args.system), args.model)
    if args.plots:
        check_output(args.plots, "plots", inputs, args.overwrite)
    dp = DeepPot(args.model, batch_size=args.batch_size, backend=args.backend, progress=False)
    # a system without type_map.raw (deepmd-kit's examples/fparam data) numbers the model's types, as in dp test
    systems = open_systems(args.system, args.format, args.type_map, labelled=True, model_type_map=dp.get_type_map())
    predicted, labels, natoms = _test_errors(dp, systems, args.numb_test)
    print(error_table(predicted, labels, natoms))
    if args.plots:
        with safe_output(args.plots, "plots", inputs, args.overwrite) as tmp:
            tmp.mkdir()
            for png in parity_plots(predicted, labels, natoms, tmp):
                print(f"parity plot -> {Path(args.plots) / png.name}")
    return 0


def _cmd_info(args) -> int:
    """Print what a model is: types, cutoff, neighbour selection, network sizes."""
    from minidp.io.serialization import load_model

    m = load_model(args.model)
    cfg = m.descriptor.config
    fit = m.fitting[0]
    print(f"model        {args.model}")
    print(f"type_map     {m.type_map}")
    print(f"descriptor   se_e2_a  rcut {cfg.rcut}  rcut_smth {cfg.rcut_smth}  sel {list(cfg.sel)}")
    print(f"embedding    neuron {list(cfg.neuron)}  axis_neuron {cfg.axis_neuron}  "
          f"type_one_side {cfg.type_one_side}  activation {cfg.activation}  -> descriptor of {cfg.dim_out}")
    print(f"env matrix   exclude_types {[list(p) for p in cfg.exclude_types]}  "
          f"pair_exclude_types {[list(p) for p in cfg.pair_exclude_types]} (model)  "
          f"env_protection {cfg.env_protection:g}  set_davg_zero {cfg.set_davg_zero}")
    print(f"fitting      neuron {[layer.n_out for layer in fit.layers[:-1]]}  ({m.ntypes} nets)  "
          f"activation {fit.layers[0].activation}")
    spec = m.fitting_input
    values = {"numb_fparam": spec.numb_fparam, "numb_aparam": spec.numb_aparam, "dim_case_embd": spec.dim_case_embd,
              "atom_ener": list(m.atom_ener), "atom_exclude_types": list(m.atom_exclude_types)}
    if m.type_embedding is not None:  # one embedding net and one fitting net shared by the types
        values["type_embedding"] = (f"neuron {[layer.n_out for layer in m.type_embedding.net.layers]} "
                                    "(one shared embedding net and fitting net)")
    options = [f"{name} {values[name]}" for name in m.options()]
    if spec.default_fparam is not None:
        options.append(f"default_fparam {spec.default_fparam.tolist()}")
    if spec.use_aparam_as_mask:
        options.append("use_aparam_as_mask")
    print(f"options      {', '.join(options) or 'none'}")
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


def _compress_min_nbor_dist(args, data: dict, rcut: float) -> tuple[float, str]:
    """The smallest neighbour distance for the grid, and where it came from: --min-nbor-dist or the
    training systems of -t when given (the user's choice wins over the model's own, and the origin
    says so), else the model file's (as `dp compress` looks). Checked: finite, > 0, < rcut."""
    from minidp.compress import check_min_nbor_dist
    from minidp.io.serialization import min_nbor_dist

    stored = min_nbor_dist(data, args.input)
    instead = "" if stored is None else f", in place of the {stored:.6g} A {args.input} carries"
    if args.min_nbor_dist is not None:
        return check_min_nbor_dist("--min-nbor-dist", args.min_nbor_dist, rcut), f"given{instead}"
    if args.training_script is not None:
        from minidp.training.config import read_input
        from minidp.training.loop import training_min_nbor_dist
        from minidp.training.sampling import load_systems

        config = read_input(args.training_script)
        systems = load_systems(config.training.systems, config.type_map)
        where = f"the smallest neighbour distance of the training systems of {args.training_script}"
        return (check_min_nbor_dist(where, training_min_nbor_dist(systems, config.descriptor), rcut),
                f"from the training systems of {args.training_script}{instead}")
    if stored is not None:
        return check_min_nbor_dist(f"{args.input}: @variables.min_nbor_dist", stored, rcut), f"from {args.input}"
    raise ValueError(f"{args.input} carries no smallest neighbour distance: give the training input with "
                     "-t INPUT.json (its training systems are scanned) or the distance with --min-nbor-dist D")


def _cmd_compress(args) -> int:
    """Tabulate the embedding nets of a model (deepmd-kit's `dp compress`) and write it."""
    from dataclasses import replace

    from minidp.compress import compress_descriptor
    from minidp.io.model_check import check_model_dict
    from minidp.io.outputs import check_output
    from minidp.io.serialization import model_from_dict, model_suffix, read_model_dict, save_model

    check_output(args.output, "model", (args.input,), args.overwrite)  # refused before any work
    model_suffix(args.output)
    data = read_model_dict(args.input)
    check_model_dict(data, args.input)
    model = model_from_dict(data)
    if model.descriptor.compress is not None:
        raise ValueError(f"{args.input} is already compressed")
    rmin, origin = _compress_min_nbor_dist(args, data, model.descriptor.config.rcut)
    # a TensorFlow graph gets the range `dp --tf compress` gives it, anything else the backend-neutral one
    rule = args.range or ("tf" if Path(args.input).suffix.lower() == ".pb" else "neutral")
    se = compress_descriptor(model.descriptor, rmin, args.step, args.extrapolate, args.frequency, rule)
    save_model(args.output, replace(model, descriptor=se), overwrite=args.overwrite, inputs=(args.input,))
    t = se.compress.tables[0]
    print(f"smallest neighbour distance {rmin:.6g} A ({origin}); {len(se.compress.tables)} tables of "
          f"{t.nspline} pieces, s in [{t.lower:g}, {t.upper:g}) by {t.stride0:g} ({rule} range), then to "
          f"{t.table_max:g} by {t.stride1:g} -> {args.output}")
    return 0


def _add_compress(sub) -> None:
    from minidp.compress import (
        DEFAULT_CHECK_FREQUENCY,
        DEFAULT_EXTRAPOLATE,
        DEFAULT_STEP,
        RANGE_RULES,
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
    p.add_argument("--range", choices=RANGE_RULES, default=None,
                   help="whose range of s the first table covers: 'tf' as `dp --tf compress` (first column of "
                        "davg/dstd), 'neutral' as `dp --pt compress` (all four columns); default: 'tf' for a "
                        ".pb input, else 'neutral'")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-t", "--training-script", default=None,
                       help="training input (JSON): the smallest neighbour distance of its training systems "
                            "(used in place of the model's own)")
    where.add_argument("--min-nbor-dist", type=float, default=None,
                       help="the smallest neighbour distance (A), used in place of the model's own")
    _overwrite_option(p)
    p.set_defaults(func=_cmd_compress)


def _cmd_train(args) -> int:
    """Train a model from deepmd-kit's input.json and write it in deepmd-kit's serialization."""
    from minidp.training.config import read_input, with_numb_steps
    from minidp.training.loop import train

    config = read_input(args.input)
    if args.numb_steps is not None:
        config = with_numb_steps(config, args.numb_steps)
    result = train(config, args.output, args.workdir, args.restart, progress=not args.quiet,
                   overwrite=args.overwrite, init_model=args.init_model)
    rows = [f"{s}: rmse_e {v.rmse_e:.3e} eV/atom  rmse_f {v.rmse_f:.3e} eV/A" for s, v in result.last.items()]
    print(f"trained {config.numb_steps} steps, {result.seconds_per_step:.4f} s/step; last line: " + "; ".join(rows))
    print(f"model written to {args.output}; learning curve in {Path(args.workdir) / config.disp_file} and lcurve.png")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an se_e2_a model from deepmd-kit's input.json")
    p.add_argument("input", help="deepmd-kit training input (JSON); systems relative to its folder")
    p.add_argument("-o", "--output", required=True, help="trained model: .dp, .yaml or .json (deepmd-kit's serialization)")
    p.add_argument("--restart", default=None, help="resume from a checkpoint (<save_ckpt>-<step>, its .dp or .npz)")
    p.add_argument("--init-model", default=None, help="start from this trained model's weights (step 0)")
    p.add_argument("--workdir", default=".", help="folder for lcurve.out, checkpoints and lcurve.png (default: .)")
    p.add_argument("--numb-steps", type=int, default=None, help="override training/numb_steps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _overwrite_option(p)
    p.set_defaults(func=_cmd_train)


def _overwrite_option(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that hold a previous minidp output of the same kind (never other files)")


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
    p.add_argument("--backend", choices=BACKENDS, default="numba",
                   help="numba (default), numpy (the same fast path), or reference (the plain path of "
                        "minidp/se_e2_a.py; slower)")
    _overwrite_option(p)
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


def _cmd_model_devi(args) -> int:
    """Model deviation of an ensemble on each system, appended to the output as dp model-devi writes it.

    Every system is opened (and checked: an empty or damaged one is refused) before any is evaluated.
    """
    from minidp.active.model_devi import Ensemble, system_deviations, write_model_devi
    from minidp.checks import number, positive_int
    from minidp.io.outputs import check_output
    from minidp.io.systems import frames_per_block, open_systems, system_file

    frequency = positive_int("--frequency", args.frequency)
    relative, relative_v = (None if v is None else number(name, v, lo=0.0)
                            for name, v in (("--relative", args.relative), ("--relative_v", args.relative_v)))
    inputs = (*args.models, *(system_file(s) for s in args.system))
    check_output(args.output, "model_devi", inputs, overwrite=True)  # appends only to a model_devi file
    systems = [system for root in args.system for system in open_systems(root)]
    ensemble = Ensemble(args.models, batch_size=args.batch_size, progress=False)
    blocks = []
    for system in systems:
        steps, devi = system_deviations(ensemble, system, frequency=frequency, real_error=args.real_error,
                                        frames_per_block=frames_per_block(system.natoms), relative=relative,
                                        relative_v=relative_v, atomic=args.atomic)
        blocks.append((system.name, steps, devi))
        print(f"{system.name}: {len(steps)} frames, max_devi_f up to {devi[:, 3].max():.3e}")
    write_model_devi(args.output, blocks, atomic=args.atomic, inputs=inputs)
    print(f"{len(blocks)} system(s) -> {args.output}")
    return 0


def _add_model_devi(sub) -> None:
    p = sub.add_parser("model-devi", help="model deviation of an ensemble, like `dp model-devi`")
    p.add_argument("-m", "--models", nargs="+", required=True, help="2 or more models (.dp, .yaml, .json)")
    p.add_argument("-s", "--system", nargs="+", required=True,
                   help="systems (any format eval reads); folders are searched for type.raw, HDF5 files for "
                        "groups holding one")
    p.add_argument("-o", "--output", default="model_devi.out",
                   help="output file, appended to (default: model_devi.out)")
    p.add_argument("-f", "--frequency", type=int, default=1, help="steps between frames: step = frame * FREQ")
    p.add_argument("--real_error", action="store_true", help="RMS error against the systems' labels instead")
    p.add_argument("--atomic", action="store_true", help="also write the force deviation of every atom")
    p.add_argument("--relative", type=float, default=None, metavar="L",
                   help="relative force deviation: divided by |<F_i>| + L")
    p.add_argument("--relative_v", type=float, default=None, metavar="L",
                   help="relative virial deviation, per component: divided by |<W_c/natoms>| + L, as "
                        "deepmd-kit's C++ (LAMMPS) compute_relative_std; deepmd-kit 3.2's Python divides "
                        "by the norm of the 9 components and fails on more than one frame")
    p.add_argument("--batch-size", type=int, default=None, help="atoms per chunk (default: from free memory)")
    p.set_defaults(func=_cmd_model_devi)


def _cmd_neighbor_stat(args) -> int:
    """Smallest neighbour distance and largest neighbour count per type, printed as dp neighbor-stat prints them."""
    from minidp.active.model_devi import expand_systems
    from minidp.active.neighbor_stat import neighbor_stat

    stat = neighbor_stat(expand_systems(args.system), args.rcut, args.type_map)
    print(f"min_nbor_dist: {stat.min_nbor_dist:f}")
    print(f"max_nbor_size: {np.array(stat.max_nbor_size)!s}")
    return 0


def _add_neighbor_stat(sub) -> None:
    p = sub.add_parser("neighbor-stat", help="smallest neighbour distance and largest neighbour counts, "
                                             "like `dp neighbor-stat`")
    p.add_argument("-s", "--system", nargs="+", required=True,
                   help="systems (deepmd/npy folders, searched for type.raw, or deepmd/hdf5 files)")
    p.add_argument("-r", "--rcut", type=float, default=6.0, help="cutoff radius (default 6.0)")
    p.add_argument("-t", "--type-map", nargs="+", default=None, help="type map (default: the systems')")
    p.set_defaults(func=_cmd_neighbor_stat)


def _cmd_change_bias(args) -> int:
    """A model with its per-type energy bias changed from data (or set from -b), like dp change-bias."""
    from minidp.active.change_bias import change_bias
    from minidp.active.model_devi import expand_systems

    systems = expand_systems(args.system) if args.system else ()
    old, new = change_bias(args.model, args.output, systems, args.mode, args.numb_batch, args.bias_value,
                           args.overwrite)
    print(f"bias per type changed from {old} to {new}; model written to {args.output}")
    return 0


def _add_change_bias(sub) -> None:
    p = sub.add_parser("change-bias", help="change the per-type energy bias from data, like `dp change-bias`")
    p.add_argument("model", help="model file (.dp, .yaml, .json; .pb/.pth with deepmd-kit)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-s", "--system", nargs="+", help="labelled systems (deepmd/npy folders, searched for "
                                                          "type.raw, or deepmd/hdf5 files)")
    source.add_argument("-b", "--bias-value", type=float, nargs="+", default=None,
                        help="the new bias of each type of the model's type map, e.g. -93.57 -187.1")
    p.add_argument("-o", "--output", required=True, help="the model after the change (.dp, .yaml, .json)")
    p.add_argument("-m", "--mode", choices=["change", "set"], default="change",
                   help="change: add the least-squares shift of the residuals (label - model); "
                        "set: the least-squares bias of the labels alone (default: change)")
    p.add_argument("-n", "--numb-batch", type=int, default=0,
                   help="frames used from each system, the first ones (default 0: all)")
    _overwrite_option(p)
    p.set_defaults(func=_cmd_change_bias)


def _cmd_lammps(args) -> int:
    """Run a LAMMPS input deck written for deepmd-kit's pair_style deepmd (or with pair_style minidp)."""
    from minidp.md.lammps import LammpsInputError, mpi_rank, run_deck

    try:
        if args.partition is not None:
            raise LammpsInputError(f"-p {' '.join(args.partition)}: minidp lammps runs one partition (no multi-replica "
                                   "runs such as DP-GEN's path-integral nbeads)")
        if (args.input is None) == (args.input_flag is None):
            given = "two decks" if args.input is not None else "no deck"
            raise LammpsInputError(f"minidp lammps takes one input deck, as 'minidp lammps in.lammps' or "
                                   f"'minidp lammps -i in.lammps'; got {given}")
        return run_deck(args.input or args.input_flag, [tuple(v) for v in args.var], log=args.log,
                        screen=args.screen, finalize=True, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError):
        if mpi_rank() != 0:
            return 2  # under mpirun every rank refuses the same deck alike: rank 0 alone says why
        raise


def _add_lammps(sub) -> None:
    p = sub.add_parser("lammps", help="run a LAMMPS deck written for pair_style deepmd (deepmd-kit's decks, DP-GEN's), "
                                      "or with pair_style minidp")
    p.add_argument("input", nargs="?", default=None,
                   help="LAMMPS input deck (pair_style deepmd|minidp MODEL [MODEL...] [keywords] + pair_coeff * * "
                        "[ELEMENT...]); or -i")
    p.add_argument("-i", "-in", dest="input_flag", default=None, metavar="FILE",
                   help="the input deck, as LAMMPS's -in (DP-GEN runs 'COMMAND -i input.lammps -v restart 0')")
    p.add_argument("-v", "-var", "--var", dest="var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set an index variable, as lmp -var NAME VALUE (repeatable)")
    p.add_argument("-l", "-log", "--log", dest="log", default=None,
                   help="LAMMPS log file (default log.lammps; none: no log); never an input, never an existing file "
                        "(with --overwrite: only an earlier LAMMPS log)")
    p.add_argument("-sc", "-screen", "--screen", dest="screen", default=None,
                   help="LAMMPS screen output file (none: silent); checked as -log")
    p.add_argument("-p", "-partition", dest="partition", nargs="+", default=None, metavar="PxM",
                   help="refused: minidp lammps runs one partition")
    _overwrite_option(p)
    p.set_defaults(func=_cmd_lammps)


def _cmd_ipi(args) -> int:
    """Serve minidp's energy, forces and virial to an i-PI server until it ends."""
    from minidp.md.ipi import run_client

    run_client(args)
    return 0


def _add_ipi(sub) -> None:
    from minidp.md.ipi import add_arguments

    p = sub.add_parser("ipi", help="an i-PI force client (socket protocol), like deepmd-kit's dp_ipi")
    add_arguments(p)
    p.set_defaults(func=_cmd_ipi)


class Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors on one line as every other error of minidp: the usage
    block argparse prints first is left out (``--help`` shows it), the exit status stays 2.
    Subparsers are made of the parser's own class, so this holds for every subcommand, and each
    refuses the arguments it does not know itself, so that the error names the subcommand."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minidp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_train(sub)
    _add_model_devi(sub)
    _add_neighbor_stat(sub)
    _add_change_bias(sub)
    _add_compress(sub)
    _add_tutorial(sub)
    _add_lammps(sub)
    _add_ipi(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Expected failures (bad input, a missing package, the file system) print one
    line and return 2; Ctrl-C prints "interrupted" and returns 130. Other exceptions are bugs and keep
    their traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error (one line, 2) or --help (0): the status, returned as any other
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # every writer cleans its temporary output on the way out: nothing partial is left
        print(f"minidp {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"minidp {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
