r"""Training an se_e2_a energy model from deepmd-kit's input.json, every gradient by hand.

The story of one run (:func:`train`):

1. **Input** (:func:`minidp.training.config.parse_input`): deepmd-kit's training input, the
   se_e2_a + ``ener`` subset; any other key is refused by name.
2. **Data** (:func:`load_systems`): deepmd/npy systems read through dpdata,
   their element names mapped onto the model's ``type_map``.
3. **Statistics** (:mod:`minidp.stats`): davg/dstd of the environment matrix,
   the per-type energy bias and (with numb_fparam / numb_aparam) the averages and
   spreads of fparam / aparam, from ``data_stat_nbatch`` batches per system.
4. **Steps**: a batch of frames from one system (systems drawn in proportion
   to their frames, frames in a shuffled order); the loss and its exact
   gradient (:func:`minidp.training.loss.loss_and_grad`); one Adam (or AdamW) update at the
   learning rate of deepmd-kit's schedule (``exp``, ``cosine`` or ``wsd``, with its warm-up:
   :func:`minidp.optim.lr_schedule`), e.g. ``exp``'s :math:`\eta_t = \eta_0 r^{\lfloor t/s \rfloor}`.
   With ``training/mixed_precision`` the loss and gradient are those of the model's copy whose
   nets compute on rounded operands (:meth:`minidp.model.EnergyModel.with_compute`); the update
   goes to the master weights.
5. **Record**: every ``disp_freq`` steps a line of ``lcurve.out`` in
   deepmd-kit's columns; every ``save_freq`` steps a checkpoint
   (model ``.dp`` + optimizer and sampler state ``.npz``) that ``restart``
   resumes exactly; at the end the model in deepmd-kit's serialization and
   a plot of the learning curve. Every file goes through
   :func:`minidp.io.outputs.safe_output`, and :func:`plan_outputs` refuses, before
   any data is read, a run that would write over another run's files; a
   restart that disagrees with its checkpoint is refused by name.

Step t reports the errors of the weights before its update, so the line of
step 0 is the untrained model and the last line (t = numb_steps) the final one.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei``).
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp.active.neighbor_stat import stat_blocks
from minidp.checks import FrameError, InputError, file_path
from minidp.io.serialization import NATIVE_SUFFIXES, load_model, save_model
from minidp.model import EnergyModel, new_model
from minidp.optim import Adam
from minidp.runtime import Workers, default_workers, keep_freed_memory
from minidp.se_e2_a import SeAConfig
from minidp.stats import energy_bias, env_stats, param_stats, param_sums, raw_env_sums, type_counts
from minidp.training.checkpoint import (
    _restore,
    data_fingerprint,
    load_checkpoint,
    load_checkpoint_state,
    options_mismatch,
    restore_optimizer,
    save_checkpoint,
)
from minidp.training.config import TrainConfig
from minidp.training.lcurve import lcurve_line, plot_lcurves, write_lcurve_line
from minidp.training.loss import Batch, LossValue, batch_errors, loss_and_grad, prefactors, shown_terms
from minidp.training.sampling import Sampler, System, in_system, load_systems, make_batch, stats_rng
from minidp.training.workdir import OutputPlan, plan_outputs, prune_checkpoints, workdir_lock


def initial_model(config: TrainConfig, systems: list[System], sampler: Sampler) -> EnergyModel:
    """new_model, then davg/dstd, the energy bias and the fparam/aparam statistics (minidp.stats) from
    data_stat_nbatch batches per system.

    The frames are drawn by :func:`stats_rng`; the sampler gives the batch sizes only and is not advanced.
    """
    cfg, spec = config.descriptor, config.fitting_input
    # the nets in the input's precisions (float32: deepmd-kit's meaning, see minidp.model.new_model)
    dtype, fitting_dtype = (np.float32 if p == "float32" else np.float64 for p in config.precision)
    model = new_model(list(config.type_map), cfg, config.fitting_neuron, config.fitting_resnet_dt, config.model_seed,
                      dtype=dtype, fitting_dtype=fitting_dtype, fitting_activation=config.fitting_activation,
                      fitting_input=spec, atom_ener=config.atom_ener, atom_exclude_types=config.atom_exclude_types)
    sums = np.zeros((cfg.ntypes, 5))
    # (nfp, 3), (nap, 3): (n, sum x, sum x^2) per parameter
    fparam_sums, aparam_sums = np.zeros((spec.numb_fparam, 3)), np.zeros((spec.numb_aparam, 3))
    mean_energy, counts = [], []
    rng = stats_rng(config.seed)
    for k, s in enumerate(systems):
        n = min(s.nframes, config.data_stat_nbatch * sampler.sizes[k])
        frames = np.sort(rng.choice(s.nframes, n, replace=False))
        try:
            sums += raw_env_sums(s.coords[frames], None if s.cells is None else s.cells[frames], s.atom_types, cfg)
        except FrameError as err:
            raise in_system(err, s, frames) from None
        if spec.numb_fparam:  # frames given default_fparam are not data (deepmd-kit leaves them out too)
            fparam_sums += param_sums(s.fparam[frames[s.fparam_found[frames]]], spec.numb_fparam)
        if spec.numb_aparam:
            aparam_sums += param_sums(s.aparam[frames], spec.numb_aparam)
        mean_energy.append(s.energy[frames].mean())
        counts.append(type_counts(s.atom_types, cfg.ntypes, config.atom_exclude_types))
    model.descriptor.davg, model.descriptor.dstd = env_stats(sums, cfg)
    model.bias = energy_bias(np.array(mean_energy), np.array(counts))
    fparam_avg, fparam_inv_std = param_stats(fparam_sums)
    aparam_avg, aparam_inv_std = param_stats(aparam_sums)
    model.fitting_input = replace(spec, fparam_avg=fparam_avg, fparam_inv_std=fparam_inv_std, aparam_avg=aparam_avg,
                                  aparam_inv_std=aparam_inv_std)
    return model


# ---------------------------------------------------------------------------
# 5. The run
# ---------------------------------------------------------------------------


def evaluate(model: EnergyModel, batches: list[Batch], pref) -> LossValue:
    """Errors over some batches, each batch's RMSEs weighted by its atoms (deepmd-kit's average)."""
    values, weights = [], []
    for b in batches:
        values.append(batch_errors(model, b, pref))
        weights.append(b.atom_types.size)
    return LossValue(*np.average(np.array(values), axis=0, weights=weights))


def validation_errors(model: EnergyModel, systems: list[System], sampler: Sampler, config: TrainConfig, pref) -> LossValue:
    """The errors on the next numb_btch validation batches (deepmd-kit draws new ones at every display)."""
    draws = [sampler.next() for _ in range(config.validation.numb_btch)]
    return evaluate(model, [make_batch(systems[k], frames, config.descriptor) for k, frames in draws], pref)


class TrainResult(NamedTuple):
    model: EnergyModel  # the trained model
    seconds_per_step: float  # mean wall time of a training step (batch, loss, gradient, update) after the first 10
    step_seconds: np.ndarray  # (steps,) each step's wall time, displays and checkpoints excluded
    last: dict[str, LossValue]  # the errors of the last lcurve line, by set ("trn", "val")


def training_min_nbor_dist(systems: list[System], cfg: SeAConfig, frames_per_block: int = 64) -> float:
    """The smallest neighbour distance of the training data (minidp.active.neighbor_stat, within rcut), which
    the saved model keeps for compression."""

    blocks = ((s.coords[i:i + frames_per_block], None if s.cells is None else s.cells[i:i + frames_per_block],
               s.atom_types) for s in systems for i in range(0, s.nframes, frames_per_block))
    return stat_blocks(blocks, cfg.rcut, cfg.ntypes).min_nbor_dist


def init_from_model(path, config: TrainConfig) -> EnergyModel:
    """--init-model: a trained model's weights, statistics and bias as the starting point (step 0)."""
    model = load_model(path)
    se = model.descriptor
    # a .pb's float32 switch (SeAConfig.float32_switch) is TensorFlow's evaluation, not part of the model's
    # shape: training goes on in float64, as deepmd-kit's does and as the saved model will compute
    model = replace(model, descriptor=replace(se, config=replace(se.config, float32_switch=False)))
    if model.descriptor.config != config.descriptor or tuple(model.type_map) != config.type_map:
        raise ValueError(f"--init-model {path} is a model of another shape than the input describes: "
                         f"{model.type_map} {model.descriptor.config} vs {list(config.type_map)} {config.descriptor}")
    hidden = tuple(layer.n_out for layer in model.fitting[0].layers[:-1])
    if hidden != config.fitting_neuron:
        raise ValueError(f"--init-model {path} has fitting widths {list(hidden)}; the input asks for "
                         f"{list(config.fitting_neuron)}")
    diffs = options_mismatch(model, config)
    if diffs:
        raise ValueError(f"--init-model {path} does not match the input: " + "; ".join(diffs))
    return model


class Run(NamedTuple):
    """What a run starts from (``_setup``)."""

    train_sys: list[System]  # training systems
    val_sys: list[System]  # validation systems ([] without validation_data)
    samplers: dict[str, Sampler]  # "trn" (and "val"): the batch samplers
    model: EnergyModel  # the weights at the first step
    opt: Adam  # the optimizer, with its moments
    step: int  # the first step (0, or the checkpoint's)
    data: str  # the training data's fingerprint (data_fingerprint)


def _setup(config: TrainConfig, restart, init_model=None) -> Run:
    """Systems, samplers, model and optimizer: fresh (or from init_model), or as a checkpoint left them."""
    # the loss's extra per-atom labels (atom_ener, atom_pref, ...), read with the frames
    labels = config.loss.label_files()
    # and the model's frame and atomic parameters (fparam.npy, aparam.npy) when it reads them
    spec = config.fitting_input
    params = (spec.numb_fparam, spec.numb_aparam, spec.default_fparam)
    train_sys = load_systems(config.training.systems, config.type_map, labels, *params)
    val_sys = load_systems(config.validation.systems, config.type_map, labels, *params) if config.validation else []
    samplers = {"trn": Sampler(train_sys, config.training.batch_size, config.seed, config.training.sys_probs,
                               config.training.auto_prob)}
    if val_sys:
        samplers["val"] = Sampler(val_sys, config.validation.batch_size, config.seed + 1,
                                  config.validation.sys_probs, config.validation.auto_prob)
    data = data_fingerprint(train_sys)
    if restart is None:
        fresh = init_model is None
        model = initial_model(config, train_sys, samplers["trn"]) if fresh else init_from_model(init_model, config)
        step = 0
    else:
        model, state = load_checkpoint(restart)
        step = _restore(model, state, config, samplers, data, restart)
    opt = Adam(model.params(), config.optimizer)
    if restart is not None:
        restore_optimizer(opt, state)
    return Run(train_sys, val_sys, samplers, model, opt, step, data)


def check_step(step: int, first: bool, errors: dict[str, LossValue], grads, last_checkpoint) -> None:
    """InputError at the first step whose loss (training or validation) or gradient holds a NaN or
    an inf: the run stops there, before the weights or a checkpoint take it in, so that no model or
    checkpoint minidp would refuse (or could not resume from) is written. ``first``: the run's first
    step, where the weights are those it started from (then the data are the likely cause)."""
    finite = all(np.isfinite(v.loss) for v in errors.values()) and \
        all(np.isfinite(a).all() for p in grads for a in p.values())
    if finite:
        return
    losses = ", ".join(f"{name} {v.loss:.4g}" for name, v in errors.items())
    cause = ("labels too large for float64?" if first else "the run diverged: a smaller start_lr may help")
    kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint is not None else "no checkpoint written"
    raise InputError(f"training stopped at step {step}: the loss or its gradient is not finite (loss {losses}; "
                     f"{cause}); no model written, {kept}")


class Drawn(NamedTuple):
    """A step's training batch, drawn ahead (:func:`draw`)."""

    states: dict | None  # the samplers' states before the draw (the step's checkpoint holds them), when due
    batch: Future  # its Batch: the neighbour list is built on a worker thread


def draw(config: TrainConfig, run: Run, step: int, workers: Workers) -> Drawn:
    """Step ``step``'s batch: drawn now, its neighbour list built on one of ``workers``' threads.

    The loop draws a step's batch while the step before it updates the weights (the two are
    independent): the neighbour list (~1.5 ms for 192 atoms) and the Adam update (~1.4 ms in float32)
    then run at once instead of one after the other.
    """
    # a checkpoint holds the state at the top of a step (resuming from it repeats nothing)
    due = step > run.step and (step % config.save_freq == 0 or step == config.numb_steps)
    states = {name: sampler.state() for name, sampler in run.samplers.items()} if due else None
    k, frames = run.samplers["trn"].next()
    return Drawn(states, workers.submit(make_batch, run.train_sys[k], frames, config.descriptor))


def _steps(config: TrainConfig, run: Run, plan: OutputPlan, workdir: Path, restart, progress: bool,
           overwrite: bool) -> TrainResult:
    """The loop (module docstring): steps run.step..numb_steps, lcurve lines and checkpoints on the way."""
    import time

    from tqdm import tqdm

    n, model, opt, samplers = config.numb_steps, run.model, run.opt, run.samplers
    virial = config.loss.start_pref_v > 0 or config.loss.limit_pref_v > 0
    head, times, last, checkpoint = plan.head, [], {}, restart
    bar = tqdm(total=n, initial=run.step, disable=not progress, unit="step", desc="training")
    # the run's threads: every step's parallel regions (loss_and_grad) and the batches drawn ahead (draw)
    with Workers(default_workers()) as workers:
        drawn = draw(config, run, run.step, workers)
        for step in range(run.step, n + 1):
            t0 = time.perf_counter()
            lr = config.lr.lr(step)
            # deepmd-kit's prefactors follow lr / start_lr (warm-up included)
            pref = prefactors(config.loss, lr, config.lr.start_lr)
            # mixed precision: this step's copy of the nets with rounded weights; its gradients update model
            mixed = config.mixed_precision
            computed = model if mixed is None else model.with_compute(mixed.compute_prec)
            # overflow in a diverging run is reported by check_step, in one line
            with np.errstate(over="ignore", invalid="ignore"):
                value, grads, _ = loss_and_grad(computed, drawn.batch.result(), pref, workers=workers)
                elapsed = time.perf_counter() - t0
                shown = config.disp_training and (step % config.disp_freq == 0 or step == n)
                # training and validation errors of the same weights, those before this step's update
                errors = {"trn": value}
                if shown and run.val_sys:
                    errors["val"] = validation_errors(computed, run.val_sys, samplers["val"], config, pref)
            # written once the step's loss is known to be finite, so the last checkpoint is a good one
            check_step(step, step == run.step, errors, grads, checkpoint)
            if drawn.states is not None:
                checkpoint = save_checkpoint(workdir / config.save_ckpt, step, model, opt, drawn.states, run.data,
                                             overwrite)
                prune_checkpoints(workdir / config.save_ckpt, config.max_ckpt_keep)
            if shown:
                last = errors
                line = lcurve_line(step, last, lr, virial, shown_terms(config.loss))
                write_lcurve_line(plan.lcurve, line, head, plan.replace_lcurve)
                head = None
                bar.set_postfix(rmse_e=f"{value.rmse_e:.2e}", rmse_f=f"{value.rmse_f:.2e}", lr=f"{lr:.1e}")
            if step < n:
                t1 = time.perf_counter()
                drawn = draw(config, run, step + 1, workers)
                opt.step(grads, lr)
                times.append(elapsed + time.perf_counter() - t1)
                bar.update(1)
    bar.close()
    return TrainResult(model, float(np.mean(times[10:] or times or [math.nan])), np.array(times), last)


def train(config: TrainConfig, output=None, workdir=".", restart=None, progress: bool = True,
          overwrite: bool = False, init_model=None) -> TrainResult:
    """Train (module docstring); lcurve.out, checkpoints and lcurve.png go to workdir, the model to output
    (with the training data's smallest neighbour distance). ``init_model``: start from that model.

    Nothing a user made is written over (:func:`plan_outputs`); ``overwrite`` replaces minidp's own
    outputs of an earlier run. The workdir is locked for the run (:func:`workdir_lock`): a second run
    there is refused before it writes anything."""
    if output is not None and Path(output).suffix.lower() not in NATIVE_SUFFIXES:
        # refused now, not after hours of training
        raise ValueError(f"cannot write {Path(output).suffix!r} models; expected one of {NATIVE_SUFFIXES}")
    workdir = file_path("workdir", workdir, "a folder")
    begin = 0 if restart is None else int(load_checkpoint_state(restart)["step"])
    plan_outputs(config, output, workdir, restart, begin, overwrite)  # refused before the lock file is made
    with workdir_lock(workdir):
        # planned again under the lock: a run that held it may have written since
        plan = plan_outputs(config, output, workdir, restart, begin, overwrite)
        if config.ignored:
            print(f"minidp train: ignoring {', '.join(config.ignored)} (deepmd-kit's own machinery)")
        keep_freed_memory()
        run = _setup(config, restart, init_model)
        result = _steps(config, run, plan, workdir, restart, progress, overwrite)
        if output is not None:
            save_model(output, result.model, overwrite=overwrite, inputs=plan.inputs,
                       min_nbor_dist=training_min_nbor_dist(run.train_sys, config.descriptor))
        if plan.lcurve.exists():  # disp_training false writes no learning curve
            plot_lcurves({"minidp": plan.lcurve}, workdir / "lcurve.png")
    return result
