"""The force-loss weight gradient against PyTorch autograd (double backward), in float64.

A second, independent implementation: se_e2_a written with torch operations
from the positions (every slot through the embedding net, padded ones
included, as deepmd-kit does), forces and virial by torch.autograd.grad with
create_graph=True, deepmd-kit's loss, then loss.backward(). Its weight
gradient must equal minidp's hand-written one to round-off, which checks the
tangents and the reverse pass far tighter than finite differences can.
(deepmd-kit's own PyTorch backend would be the natural reference, but
deepmd-kit 3.2's wheel is built against torch 2.11 and refuses to import
beside the torch 2.13 that this project pins.)
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.training.loss import Batch, LossConfig, loss_and_grad, prefactors
from tests.test_model import make, neighbors, specs

torch = pytest.importorskip("torch")


def _net(layers, params, x):
    """The dense layers of minidp.nn, in torch: y = tanh(xW + b) * idt + (x or [x, x])."""
    for layer, p in zip(layers, params):
        z = x @ p["W"] + p["b"]
        y = z if layer.activation == "linear" else torch.tanh(z)
        if "idt" in p:
            y = y * p["idt"]
        if layer.resnet and layer.n_out == layer.n_in:
            y = y + x
        elif layer.resnet and layer.n_out == 2 * layer.n_in:
            y = y + torch.cat([x, x], dim=-1)
        x = y
    return x


def _torch_model(model, params, coords, eps, nl, types):
    """E_i (nf, nloc) from positions (nf, nloc, 3) and a strain eps (3, 3): the whole se_e2_a model in torch."""
    se, cfg = model.descriptor, model.descriptor.config
    nf, nloc, nnei = nl.nlist.shape
    real = torch.tensor(nl.nlist >= 0)
    j = torch.tensor(np.maximum(nl.nlist, 0))
    # the image shift of each pair, from minidp's r_ij (a constant)
    xj = torch.stack([coords[f][j[f]] for f in range(nf)])
    shift = torch.tensor(nl.rij) - (xj - coords[:, :, None, :]).detach()
    rij = ((xj - coords[:, :, None, :] + shift) @ (torch.eye(3, dtype=torch.float64) + eps).T) * real[..., None]
    r = torch.where(real, torch.linalg.norm(torch.where(real[..., None], rij, 1.0), dim=-1), 1.0)
    u = ((r - cfg.rcut_smth) / (cfg.rcut - cfg.rcut_smth)).clamp(0.0, 1.0)
    sw = (u**3 * (-6 * u**2 + 15 * u - 10) + 1) * real
    raw = torch.cat([(sw / r)[..., None], (sw / r**2)[..., None] * rij], dim=-1)
    R = (raw - torch.tensor(se.davg[types])) / torch.tensor(se.dstd[types])
    nets = model.nets()
    index = {name: k for k, (name, _) in enumerate(model.named_nets())}
    offsets = np.cumsum([0] + [len(n.layers) for n in nets])
    T = 0.0
    for tj in range(cfg.ntypes):
        sl = slice(cfg.sec[tj], cfg.sec[tj + 1])
        G = 0.0
        for ti in range(cfg.ntypes if not cfg.type_one_side else 1):
            net = se.nets[ti, tj]
            k = index[("embedding",) + se.nets.key(ti, tj)]
            Gi = _net(net.layers, params[offsets[k]:offsets[k + 1]], R[:, :, sl, :1])
            mask = torch.ones(nloc, dtype=torch.float64) if cfg.type_one_side else torch.tensor((types == ti) * 1.0)
            G = G + Gi * mask[None, :, None, None]
        T = T + torch.einsum("fisg,fisc->figc", G, R[:, :, sl]) / nnei
    D = (T @ T[:, :, : cfg.axis_neuron].transpose(-1, -2)).reshape(nf, nloc, -1)
    E = 0.0
    for t, fit in enumerate(model.fitting):
        k = index[("fitting", t)]
        Et = _net(fit.layers, params[offsets[k]:offsets[k + 1]], D)[..., 0] + float(model.bias[t])
        E = E + Et * torch.tensor((types == t) * 1.0)
    return E


@settings(max_examples=12, deadline=None)
@given(specs(max_atoms=8), st.floats(0.0, 1.0))
def test_weight_gradient_equals_torch_double_backward(spec, pv):
    model, coords, cells, types = make(spec)
    nl = neighbors(model, coords, cells, types)
    rng = np.random.default_rng(spec.seed)
    labels = (rng.normal(size=1), rng.normal(size=coords.shape), rng.normal(size=(1, 9)))
    pref = (0.7, 3.0, pv)
    value, grads, _ = loss_and_grad(model, Batch(nl.rij, nl.nlist, types, *labels), pref)

    params = [{k: torch.tensor(v, requires_grad=True) for k, v in p.items()} for p in model.params()]
    x = torch.tensor(coords, requires_grad=True)
    eps = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    E = _torch_model(model, params, x, eps, nl, types).sum(dim=1)
    dE_dx, dE_deps = torch.autograd.grad(E.sum(), (x, eps), create_graph=True)
    F, W = -dE_dx, -dE_deps.reshape(1, 9)
    n = types.size
    E_l, F_l, W_l = (torch.tensor(a) for a in labels)
    L = (pref[0] / n * torch.mean((E - E_l) ** 2) + pref[1] * torch.mean((F - F_l) ** 2)
         + pref[2] / n * torch.mean((W - W_l) ** 2))
    L.backward()
    assert abs(L.item() - value.loss) <= 1e-12 * abs(value.loss)
    for ours, ref in zip(grads, params):
        for k in ours:
            np.testing.assert_allclose(ours[k], ref[k].grad.numpy(), rtol=1e-9, atol=1e-12 * max(1.0, abs(value.loss)))


@settings(max_examples=10, deadline=None)
@given(specs(max_atoms=8), st.integers(1, 2))
def test_every_loss_term_gradient_equals_torch_double_backward(spec, nframes):
    """relative_f, atom_pref, atomic energy and atom_ener_coeff (with energy, force, virial), written
    in torch as deepmd-kit's dpmodel loss writes them, differentiated by autograd."""
    model, coords, cells, types = make(spec)
    coords = np.repeat(coords, nframes, axis=0)
    cells = None if cells is None else np.repeat(cells, nframes, axis=0)
    nl = neighbors(model, coords, cells, types)
    rng = np.random.default_rng(spec.seed)
    nf, n = coords.shape[:2]
    labels = dict(energy=rng.normal(size=nf), force=rng.normal(size=coords.shape), virial=rng.normal(size=(nf, 9)),
                  atom_ener=rng.normal(size=(nf, n)), atom_pref=rng.uniform(0.1, 2.0, (nf, n)),
                  atom_ener_coeff=rng.choice([-1.0, 0.5, 1.0], (nf, n)))
    config = LossConfig(0.7, 0.1, 3.0, 1.0, 0.5, 0.2, 0.8, 0.3, 1.5, 0.4, relative_f=0.3, enable_atom_ener_coeff=True)
    pref = prefactors(config, 2e-4, 1e-3)
    value, grads, _ = loss_and_grad(model, Batch(nl.rij, nl.nlist, types, **labels), pref)

    params = [{k: torch.tensor(v, requires_grad=True) for k, v in p.items()} for p in model.params()]
    x = torch.tensor(coords, requires_grad=True)
    eps = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    Ei = _torch_model(model, params, x, eps, nl, types)
    dE_dx, dE_deps = torch.autograd.grad(Ei.sum(), (x, eps), create_graph=True)
    F = -dE_dx
    lab = {k: torch.tensor(v) for k, v in labels.items()}
    E = (lab["atom_ener_coeff"] * Ei).sum(dim=1)
    scale = 1.0 / (torch.linalg.norm(lab["force"], dim=-1, keepdim=True) + pref.relative_f)
    u2 = ((F - lab["force"]) * scale) ** 2
    L = (pref.e / n * torch.mean((E - lab["energy"]) ** 2) + pref.f * torch.mean(u2)
         + pref.ae * torch.mean((Ei - lab["atom_ener"]) ** 2) + pref.pf * torch.mean(lab["atom_pref"][..., None] * u2))
    if nf == 1:  # one strain shared by the frames gives only their summed virial: the virial term needs nf = 1
        L = L + pref.v / n * torch.mean((-dE_deps.reshape(1, 9) - lab["virial"]) ** 2)
    else:
        value, grads, _ = loss_and_grad(model, Batch(nl.rij, nl.nlist, types, **{**labels, "virial": None}), pref)
    L.backward()
    assert abs(L.item() - value.loss) <= 1e-12 * abs(value.loss)
    for ours, ref in zip(grads, params):
        for k in ours:
            np.testing.assert_allclose(ours[k], ref[k].grad.numpy(), rtol=1e-9, atol=1e-12 * max(1.0, abs(value.loss)))
