r"""The se_e2_a energy model: descriptor -> per-type fitting net -> atomic energies,
and the forces and virials that follow from them by hand-written backprop.

The energy of a frame is a sum of atomic energies, each a function of the
atom's descriptor only:

.. math::

    E = \sum_i E_i, \qquad E_i = \mathcal F_{t_i}(D_i) + b_{t_i},

with one fitting net :math:`\mathcal F_t` per atom type and a constant
per-type bias ``b`` (deepmd-kit's ``bias_atom_e`` plus the atomic model's
``out_bias``). Everything the energy depends on enters through the pair
displacements :math:`\mathbf r_{ij} = \mathbf r_j - \mathbf r_i`, so one
backward pass gives :math:`\mathbf g_{ij} = \partial E / \partial \mathbf r_{ij}`
and from it

.. math::

    \mathbf F_k = -\frac{\partial E}{\partial \mathbf r_k}
        = \sum_{j} \mathbf g_{kj} - \sum_{i:\, j(i)=k} \mathbf g_{ij},
    \qquad
    W_{ab} = -\frac{\partial E}{\partial \varepsilon_{ab}} = -\sum_{ij} g_{ij,a}\, r_{ij,b},

where :math:`\varepsilon` is a homogeneous strain of the cell and all
coordinates (:math:`\mathbf r \to (1+\varepsilon)\mathbf r` scales every
:math:`\mathbf r_{ij}` the same way). The atomic virial gives each pair's term
to the neighbour j, as deepmd-kit does.

In code: :func:`model_forward` (descriptor, then fitting nets) and
:func:`model_backward` (back to g), chained by :func:`pair_gradients`; then
:func:`pair_forces_virials`; :func:`predict_frames` chains them for whole
frames, on any backend ("reference", "numpy", "numba"; see
:mod:`minidp.se_e2_a`). Splitting big frames into chunks of centre atoms is
DeepPot's business (:mod:`minidp.infer`), through :func:`scatter_pairs`.

Inputs are checked once, at the public boundary: :func:`energy_forces` (for a
caller with its own neighbour list) checks and calls :func:`predict_frames`;
DeepPot checks its frames once per call and calls :func:`predict_frames` and
:func:`pair_gradients` on each chunk, which trust their input.

Shape symbols: see :mod:`minidp.se_e2_a` (``nf, nloc, nnei, ng, m2``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from minidp import kernels
from minidp.nn import Net, embedding_net, fitting_net, net_backward, net_forward
from minidp.se_e2_a import (
    DescriptorCache,
    EmbeddingNets,
    SeA,
    SeAConfig,
    check_descriptor_inputs,
    descriptor_backward,
    descriptor_forward,
)


@dataclass
class EnergyModel:
    """Parameters of an se_e2_a + ener model."""

    type_map: list[str]  # element name of each atom type
    descriptor: SeA  # the se_e2_a descriptor
    fitting: list[Net]  # fitting[t]: net from D (ng * m2) to the atomic energy of a type-t atom
    bias: np.ndarray  # (ntypes,) constant atomic energy per type (bias_atom_e + out_bias)

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    def named_nets(self) -> list[tuple[tuple, Net]]:
        """Every trainable net once, with its name: ``("embedding",) + key`` for each net of
        ``descriptor.nets`` (key (tj,) with type_one_side, else (ti, tj)), then ``("fitting", t)``.

        Gradients (minidp.force_training) are keyed by these names.
        """
        emb = [(("embedding",) + key, net) for key, net in self.descriptor.nets.items()]
        return emb + [(("fitting", t), net) for t, net in enumerate(self.fitting)]

    def nets(self) -> list[Net]:
        """The nets of :meth:`named_nets`, in order."""
        return [net for _, net in self.named_nets()]

    def params(self) -> list[dict[str, np.ndarray]]:
        """The trainable arrays, one dict per layer of :meth:`nets` in order (what the optimizers update)."""
        return [p for net in self.nets() for p in net.params()]

    def n_params(self) -> int:
        return sum(n.n_params() for n in self.nets())

    def astype(self, dtype) -> "EnergyModel":
        """A copy whose nets (embedding and fitting) are cast to dtype: float32 is deepmd-kit's
        ``precision: float32``. davg, dstd and the bias stay float64, as deepmd-kit keeps them."""
        se = self.descriptor
        nets = EmbeddingNets(se.nets.ntypes, se.nets.type_one_side, {k: n.astype(dtype) for k, n in se.nets.items()})
        return EnergyModel(list(self.type_map), replace(se, nets=nets), [n.astype(dtype) for n in self.fitting],
                           self.bias.copy())


def new_model(
    type_map: list[str], config: SeAConfig, fitting_neuron=(240, 240, 240),
    fitting_resnet_dt: bool = True, seed: int = 0, dtype=np.float64, fitting_dtype=None,
) -> EnergyModel:
    """A freshly initialized model (deepmd-kit's initialization; davg = 0, dstd = 1, bias = 0).

    Training replaces davg/dstd and the bias by data statistics; tests use it as is.
    ``dtype`` is the embedding nets' precision and ``fitting_dtype`` (default: dtype)
    the fitting nets' (np.float32: deepmd-kit's descriptor and fitting_net
    ``precision: float32``, computed in float32 from the embedding's input to the
    atomic energies, see minidp.se_e2_a.embed_blocks); davg, dstd and the bias are
    float64 in any case.
    """
    fitting_dtype = dtype if fitting_dtype is None else fitting_dtype
    if len(type_map) != config.ntypes:
        raise ValueError(f"type_map has {len(type_map)} types but sel has {config.ntypes}")
    ntypes = config.ntypes
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def emb() -> Net:
        return embedding_net(config.neuron, 1, config.activation, config.resnet_dt, dtype, next(seeds))

    # one net per key: (tj,) with type_one_side (shared by every centre type), else (ti, tj)
    n_nets = ntypes if config.type_one_side else ntypes * ntypes
    nets = EmbeddingNets.from_list(ntypes, config.type_one_side, [emb() for _ in range(n_nets)])
    se = SeA(config, np.zeros((ntypes, config.nnei, 4)), np.ones((ntypes, config.nnei, 4)), nets)
    fitting = [fitting_net(config.dim_out, fitting_neuron, 1, "tanh", fitting_resnet_dt, fitting_dtype, next(seeds))
               for _ in range(ntypes)]
    return EnergyModel(list(type_map), se, fitting, np.zeros(ntypes))


# ---------------------------------------------------------------------------
# Atomic energies from descriptors
# ---------------------------------------------------------------------------


class FitCache(NamedTuple):
    """One atom type's block of the fitting step."""

    t: int  # the atom type
    atoms: np.ndarray  # (na,) atoms of this type
    net: Net  # its fitting net
    net_caches: list  # the net's layer caches


def type_groups(atom_types: np.ndarray, ntypes: int) -> list[tuple[int, np.ndarray]]:
    """(t, indices of the atoms of type t) for each type present: the blocks of the fitting step."""
    groups = [(t, np.flatnonzero(atom_types == t)) for t in range(ntypes)]
    return [(t, atoms) for t, atoms in groups if atoms.size]


def atomic_energy(
    D: np.ndarray, atom_types: np.ndarray, model: EnergyModel
) -> tuple[np.ndarray, list[FitCache]]:
    """E_i = F_{t_i}(D_i) + b_{t_i}; returns E_atom (nf, nloc) and the caches."""
    nf, nloc, dim = D.shape
    # (nf, nloc)  float64 whatever the nets' precision: the bias and the sums over atoms (deepmd-kit's too)
    E_atom = np.zeros((nf, nloc))
    caches = []
    for t, atoms in type_groups(atom_types, model.ntypes):
        net = model.fitting[t]
        # (nb, 1) with nb = nf * na: every atom of type t is one row, D in the net's precision
        y, net_caches = net_forward(net, D[:, atoms].reshape(-1, dim).astype(net.dtype, copy=False))
        E_atom[:, atoms] = y.reshape(nf, atoms.size).astype(np.float64) + model.bias[t]
        caches.append(FitCache(t, atoms, model.fitting[t], net_caches))
    return E_atom, caches


def atomic_energy_backward(dE_atom: np.ndarray, caches: list[FitCache], dim: int) -> np.ndarray:
    """dL/dD (nf, nloc, ng * m2) from dL/dE_atom (nf, nloc): each type's net backward."""
    nf, nloc = dE_atom.shape
    # (nf, nloc, ng * m2)
    dD = np.zeros((nf, nloc, dim), dtype=dE_atom.dtype)
    for _, atoms, net, net_caches in caches:
        # (nb, dim)
        dy = dE_atom[:, atoms].reshape(-1, 1).astype(net.dtype, copy=False)
        dx, _ = net_backward(net, net_caches, dy, param_grads=False)
        dD[:, atoms] = dx.reshape(nf, atoms.size, dim)
    return dD


# ---------------------------------------------------------------------------
# Forces and virials from the pair gradients g_ij = dE/d r_ij
# ---------------------------------------------------------------------------


def scatter_pairs(g: np.ndarray, rij: np.ndarray, nlist: np.ndarray, F: np.ndarray, W: np.ndarray,
                  first: int = 0, backend: str = "numba") -> None:
    r"""Add each pair's terms onto F (nf, n, 3) and W (nf, n, 9), in place (math in the module docstring):

    F_i += g_ij,  F_j -= g_ij,  W_j -= g_ij (x) r_ij   (W flattened a*3 + b)

    for the centre atoms i = first + c of g, rij (nf, nc, nnei, 3) and their
    neighbours j = nlist[f, c, k] >= 0, both numbered in F's n atoms.
    :func:`pair_forces_virials` calls it on whole frames (first = 0); DeepPot
    on the chunks of big frames.
    """
    nf, nc, nnei, _ = g.shape
    n = F.shape[1]
    if backend != "numba":
        # the centre atom's share: r_ij = r_j - r_i moves against r_i
        F[:, first:first + nc] += g.sum(axis=2)
        # Scatter onto the neighbours j. Padded slots (j = -1) carry g = 0, so
        # sending them to atom 0 adds nothing; offsets separate the frames.
        # (nf * nc * nnei,)
        j = (np.maximum(nlist, 0) + n * np.arange(nf)[:, None, None]).reshape(-1)
        # (nf * nc * nnei, 3, 3)  each pair's virial -g_a r_b
        w = (-g[..., :, None] * rij[..., None, :]).reshape(-1, 3, 3)
        for a in range(3):
            F[..., a] -= np.bincount(j, weights=g[..., a].reshape(-1), minlength=nf * n).reshape(nf, n)
            for b in range(3):
                W[..., 3 * a + b] += np.bincount(j, weights=w[:, a, b], minlength=nf * n).reshape(nf, n)
        return
    # Numba: one pass over the pairs, no (pairs, 3, 3) temporary
    kernels.scatter_pairs(g, rij, nlist, first, F, W)


def pair_forces_virials(g: np.ndarray, rij: np.ndarray, nlist: np.ndarray,
                        backend: str = "numba") -> tuple[np.ndarray, np.ndarray]:
    r"""Forces F (nf, nloc, 3) and atomic virials W (nf, nloc, 9) of whole frames from the pair gradients:

    F_k = sum_j g_kj - sum_{(i,j): j = k} g_ij,   W_k = -sum_{(i,j): j = k} g_ij (x) r_ij

    g, rij: (nf, nloc, nnei, 3); nlist (nf, nloc, nnei) numbers the neighbours among the nloc atoms.
    """
    nf, nloc, _, _ = g.shape
    # (nf, nloc, 3), (nf, nloc, 9)
    F = np.zeros((nf, nloc, 3), dtype=g.dtype)
    W = np.zeros((nf, nloc, 9), dtype=g.dtype)
    scatter_pairs(g, rij, nlist, F, W, 0, backend)
    return F, W


# ---------------------------------------------------------------------------
# The whole model: energy, forces, virials
# ---------------------------------------------------------------------------


class Prediction(NamedTuple):
    """Outputs for a batch of frames (deepmd-kit's shapes, less the trailing 1 on energies)."""

    energy: np.ndarray  # (nf,) total energy
    force: np.ndarray  # (nf, nloc, 3)
    virial: np.ndarray  # (nf, 9)
    atom_energy: np.ndarray  # (nf, nloc)
    atom_virial: np.ndarray  # (nf, nloc, 9)


class ModelCache(NamedTuple):
    """What model_backward needs (and training's second-order step: D and the descriptor's cache)."""

    D: np.ndarray  # (nf, nc, ng * m2) the descriptors
    descriptor_cache: DescriptorCache
    fitting_caches: list[FitCache]


def model_forward(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
    keep: bool = False,
) -> tuple[np.ndarray, ModelCache]:
    r"""Atomic energies E_i = F_{t_i}(D_i) + b_{t_i} (nf, nc), D from the pair displacements, and the cache.

    rij, nlist (nf, nc, nnei, ...) and atom_types (nc,) are any nc centre atoms
    (all of a frame, or a chunk of one). ``keep`` keeps what training needs
    (minidp.loss). Trusts its input (see the module docstring).
    """
    D, dcache = descriptor_forward(rij, nlist, atom_types, model.descriptor, backend, keep)
    E_atom, fcaches = atomic_energy(D, atom_types, model)
    return E_atom, ModelCache(D, dcache, fcaches)


def model_backward(cache: ModelCache, model: EnergyModel, backend: str = "numba") -> np.ndarray:
    r"""The pair gradients g_ij = dE/d r_ij (nf, nc, nnei, 3), E = sum_i E_i.

    Backward from dE/dE_i = 1 (the energy is the atomic energies' plain sum)
    through the fitting nets and the descriptor.
    """
    D = cache.D
    # (nf, nc, ng * m2)
    dD = atomic_energy_backward(np.ones(D.shape[:2], dtype=D.dtype), cache.fitting_caches, D.shape[-1])
    # (nf, nc, nnei, 3)
    return descriptor_backward(dD, cache.descriptor_cache, model.descriptor, backend)


class PairGradients(NamedTuple):
    """Atomic energies and the pair gradients of nc centre atoms."""

    E_atom: np.ndarray  # (nf, nc)
    g: np.ndarray  # (nf, nc, nnei, 3)  g_ij = dE/d r_ij


def pair_gradients(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
) -> PairGradients:
    r"""Atomic energies E_i (nf, nc) and the pair gradients g_ij = dE/d r_ij (nf, nc, nnei, 3).

    :func:`model_forward`, then :func:`model_backward`. rij, nlist
    (nf, nc, nnei, ...) and atom_types (nc,) are any nc centre atoms (all of a
    frame, or a chunk of one). Trusts its input (see the module docstring).
    """
    E_atom, cache = model_forward(rij, nlist, atom_types, model, backend)
    return PairGradients(E_atom, model_backward(cache, model, backend))


def predict_frames(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
) -> Prediction:
    """Energy, forces and virials of whole frames: :func:`pair_gradients`, then :func:`pair_forces_virials`.

    rij, nlist (nf, nloc, nnei, ...), atom_types (nloc,). Trusts its input:
    :func:`energy_forces` is the checked entry.
    """
    E_atom, g = pair_gradients(rij, nlist, atom_types, model, backend)
    force, atom_virial = pair_forces_virials(g, rij, nlist, backend)
    return Prediction(
        energy=E_atom.sum(axis=1),
        force=force,
        virial=atom_virial.sum(axis=1),
        atom_energy=E_atom,
        atom_virial=atom_virial,
    )


def energy_forces(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
) -> Prediction:
    """Energy, forces and virials of whole frames, for a caller with its own neighbour list.

    rij, nlist (nf, nloc, nnei, ...) as :func:`minidp.neighbor.build_neighbor_list`
    gives them, atom_types (nloc,); ``backend`` is "reference", "numpy" or
    "numba" (see minidp.se_e2_a). The backend and the nlist's layout are
    checked (:func:`minidp.se_e2_a.check_descriptor_inputs`), then
    :func:`predict_frames` computes.
    """
    check_descriptor_inputs(nlist, model.descriptor, backend)
    return predict_frames(rij, nlist, atom_types, model, backend)
