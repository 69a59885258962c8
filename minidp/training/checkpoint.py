"""Checkpoints: the model, the optimizer's moments and the samplers' state, written
whole, read back and checked against the input and the data before a restart.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from minidp.io.outputs import safe_output
from minidp.io.serialization import load_model, save_model
from minidp.model import EnergyModel, new_model
from minidp.optim import Adam
from minidp.training.config import TrainConfig
from minidp.training.sampling import System


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """<path>.dp and <path>.npz (appended: a stem such as model.ckpt-1000 has dots of its own)."""
    return path.parent / f"{path.name}.dp", path.parent / f"{path.name}.npz"


def save_checkpoint(stem: Path, step: int, model: EnergyModel, opt: Adam, sampler_states: dict[str, dict],
                    data: str = "", overwrite: bool = False) -> Path:
    """<stem>-<step>.dp (the model) and <stem>-<step>.npz (Adam's moments, step, the samplers' states
    (Sampler.state, by name) and ``data``, the fingerprint of the training data), each written
    atomically, the .npz last: a checkpoint is complete when both exist. A lone .dp (a run killed
    between the two) is replaced."""
    path = stem.parent / f"{stem.name}-{step}"
    dp_file, npz_file = checkpoint_files(path)
    save_model(dp_file, model, overwrite=overwrite or not npz_file.exists())
    state = {"step": np.array(step), "adam_t": np.array(opt.t), "data": np.array(data)}
    for i, (m, v) in enumerate(zip(opt.m, opt.v)):
        state.update({f"m_{i}_{k}": a for k, a in m.items()})
        state.update({f"v_{i}_{k}": a for k, a in v.items()})
    for name, sampler_state in sampler_states.items():
        state.update({f"{name}_{k}": a for k, a in sampler_state.items()})
    with safe_output(npz_file, "checkpoint", overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **state)
    return path


def _checkpoint_path(path) -> Path:
    """<stem>-<step> from itself, its .dp or its .npz."""
    path = Path(path)
    return path.parent / path.name.removesuffix(".dp").removesuffix(".npz")


def load_checkpoint_state(path) -> dict:
    """The .npz half of a checkpoint (step, optimizer and sampler states); ValueError if it is
    missing, empty, truncated or lacks a key."""
    path = _checkpoint_path(path)
    dp_file, npz_file = checkpoint_files(path)
    for need in (dp_file, npz_file):
        if not need.is_file():
            raise FileNotFoundError(f"checkpoint {path}: {need} does not exist")
    try:
        with np.load(npz_file) as z:
            state = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile, numpy and OS errors alike: a damaged file
        raise ValueError(f"checkpoint {path}: {npz_file} is empty, truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    missing = [k for k in ("step", "adam_t") if k not in state]
    if missing or state["step"].shape != () or state["step"].dtype.kind not in "iu":
        raise ValueError(f"checkpoint {path}: {npz_file} lacks {missing or 'an integer step'}; not a minidp checkpoint")
    return state


def load_checkpoint(path) -> tuple[EnergyModel, dict]:
    """The model and state of a checkpoint, given as <stem>-<step>, or its .dp or .npz."""
    path = _checkpoint_path(path)
    state = load_checkpoint_state(path)
    try:
        model = load_model(checkpoint_files(path)[0])
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from None
    return model, state


def restore_optimizer(opt: Adam, state: dict) -> None:
    """Adam's moments and step count from a checkpoint's state (ValueError if one is missing or misshapen)."""
    opt.t = int(state["adam_t"])
    for i, (m, v) in enumerate(zip(opt.m, opt.v)):
        for k in m:
            for kind, moments in (("m", m), ("v", v)):
                saved = state.get(f"{kind}_{i}_{k}")
                if saved is None or saved.shape != moments[k].shape:
                    raise ValueError(f"checkpoint: optimizer state {kind}_{i}_{k} is missing or has shape "
                                     f"{None if saved is None else saved.shape}, expected {moments[k].shape}")
                moments[k][...] = saved


def data_fingerprint(systems: list[System]) -> str:
    """A digest of the systems' coordinates and labels, in order: a restart on other data is refused.
    The extra labels and parameters (atom_ener, atom_pref, atom_ener_coeff, drdq, fparam, aparam) count when read."""
    import hashlib

    digest = hashlib.sha256()
    for s in systems:
        extra = (s.atom_ener, s.atom_pref, s.atom_ener_coeff, s.drdq, s.fparam, s.aparam)
        for a in (s.coords, s.energy, s.force, *(x for x in extra if x is not None)):
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def options_mismatch(model: EnergyModel, config: TrainConfig) -> list[str]:
    """The fitting's options (numb_fparam, numb_aparam, default_fparam, use_aparam_as_mask, atom_ener)
    and atom_exclude_types where the input and a stored model disagree, key by key ([] if nowhere)."""
    saved, wanted = model.fitting_input, config.fitting_input
    # (EnergyModel.vacuum reads atom_ener against the types)
    vacuum = replace(model, atom_ener=config.atom_ener).vacuum

    def listed(default):
        return None if default is None else default.tolist()

    pairs = [("fitting_net/numb_fparam", wanted.numb_fparam, saved.numb_fparam),
             ("fitting_net/numb_aparam", wanted.numb_aparam, saved.numb_aparam),
             ("fitting_net/default_fparam", listed(wanted.default_fparam), listed(saved.default_fparam)),
             ("fitting_net/use_aparam_as_mask", wanted.use_aparam_as_mask, saved.use_aparam_as_mask),
             # atom_ener acts through the types whose isolated atom is subtracted (EnergyModel.vacuum)
             ("fitting_net/atom_ener", list(config.atom_ener), list(model.atom_ener), vacuum, model.vacuum),
             ("atom_exclude_types", list(config.atom_exclude_types), list(model.atom_exclude_types))]
    return [f"model/{key} {ours!r} (stored model: {theirs!r})" for key, ours, theirs, *acts in pairs
            if (acts[0] != acts[1] if acts else ours != theirs)]


def checkpoint_mismatch(model: EnergyModel, config: TrainConfig) -> list[str]:
    """What the input says that the checkpoint's model disagrees with, key by key ([] if nothing)."""
    from dataclasses import fields

    diffs = []
    if tuple(model.type_map) != config.type_map:
        diffs.append(f"model/type_map {list(config.type_map)} (checkpoint: {list(model.type_map)})")
    saved, wanted = model.descriptor.config, config.descriptor
    diffs += [f"model/descriptor/{f.name} {getattr(wanted, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
              for f in fields(saved) if getattr(saved, f.name) != getattr(wanted, f.name)]
    diffs += options_mismatch(model, config)
    widths = tuple(layer.n_out for layer in model.fitting[0].layers[:-1])
    if widths != tuple(config.fitting_neuron):
        diffs.append(f"model/fitting_net/neuron {list(config.fitting_neuron)} (checkpoint: {list(widths)})")
    elif not diffs:
        fresh = new_model(list(config.type_map), wanted, config.fitting_neuron, config.fitting_resnet_dt, 0,
                          fitting_input=config.fitting_input)
        if [{k: a.shape for k, a in p.items()} for p in fresh.params()] != \
                [{k: a.shape for k, a in p.items()} for p in model.params()]:
            diffs.append(f"model/fitting_net/resnet_dt {config.fitting_resnet_dt} "
                         f"(the checkpoint's nets were made with {not config.fitting_resnet_dt})")
    return diffs


def _restore(model: EnergyModel, state: dict, config: TrainConfig, samplers: dict, data: str, restart) -> int:
    """Check a checkpoint against the input and the data, restore the samplers; its step."""
    diffs = checkpoint_mismatch(model, config)
    if "data" in state and str(state["data"]) not in ("", data):
        diffs.append("the training data (systems, frames or labels changed since the checkpoint)")
    if diffs:
        raise ValueError(f"checkpoint {restart} does not match the input: " + "; ".join(diffs))
    for name, sampler in samplers.items():
        try:
            sampler.restore({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "_")})
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"checkpoint {restart}: its {name} sampler state is missing or damaged "
                             f"({type(err).__name__}: {err})") from None
    return int(state["step"])
