r"""The se_e2_a energy model: descriptor -> per-type fitting net -> atomic energies,
and the forces and virials that follow from them by hand-written backprop.

The energy of a frame is a sum of atomic energies, each a function of the
atom's descriptor only:

.. math::

    E = \sum_i E_i, \qquad E_i = \mathcal F_{t_i}(x_i) + b_{t_i},
    \qquad x_i = [D_i, \hat f, \hat a_i, c],

with one fitting net :math:`\mathcal F_t` per atom type and a constant
per-type bias ``b`` (deepmd-kit's ``bias_atom_e`` plus the atomic model's
``out_bias``). The net reads the descriptor, then (when the model has them)
the frame's parameters, the atom's parameters, normalized, and a fixed case
embedding (:class:`FittingInput`, :func:`fitting_input`). Two options change
which atoms count: ``atom_exclude_types`` makes :math:`E_i = 0` (bias
included) for atoms of those types, and ``atom_ener`` subtracts the
isolated atom's net output, :math:`E_i = \mathcal F_t(x_i) - \mathcal F_t(x_i^0) + b_t`
with :math:`x_i^0 = [0, \hat f, \hat a_i, c]` (:func:`atomic_energy`).
Frame and atomic parameters do not move with the atoms, so only the
descriptor part of x carries gradients to the positions.

Everything the energy depends on enters through the pair
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

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from minidp import kernels, type_embed
from minidp.nn import Net, embedding_net, fitting_net, net_backward, net_forward, net_input_cotangents, with_compute
from minidp.se_e2_a import (
    DescriptorCache,
    EmbeddingNets,
    SeA,
    SeAConfig,
    check_descriptor_inputs,
    contract,
    contract_backward,
    descriptor_backward,
    descriptor_forward,
    env_matrix,
    env_matrix_backward,
)
from minidp.type_embed import TypeEmbedding, fitting_rows, fold, type_vectors


@dataclass(frozen=True, eq=False)
class FittingInput:
    r"""What the fitting nets read besides the descriptor, in deepmd-kit's order:

    .. math::

        x_i = [D_i,\ (f - \bar f) \odot \sigma_f^{-1},\ (a_i - \bar a) \odot \sigma_a^{-1},\ c]

    with f (nfp,) the frame's parameters (``fparam``), a_i (nap,) atom i's
    (``aparam``; not read with ``use_aparam_as_mask``), their averages and
    inverse standard deviations from the training data, and c (nce,) the case
    embedding (``dim_case_embd``: a fixed vector, one-hot of a multitask
    branch or zeros). ``default_fparam`` (nfp,) stands in for f when a call
    gives none. Empty arrays: the model has no such input.
    """

    fparam_avg: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nfp,)
    fparam_inv_std: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nfp,)
    aparam_avg: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nap,)
    aparam_inv_std: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nap,)
    default_fparam: np.ndarray | None = None  # (nfp,) or None: a call must give fparam
    use_aparam_as_mask: bool = False  # aparam is taken (get_dim_aparam) but not fed to the nets
    case_embd: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nce,)

    def __post_init__(self):
        for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std", "case_embd"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim != 1 or not np.isfinite(value).all():
                raise ValueError(f"FittingInput.{name} must be a 1-d array of finite numbers, got {value!r}")
            object.__setattr__(self, name, value)
        for avg, inv_std in (("fparam_avg", "fparam_inv_std"), ("aparam_avg", "aparam_inv_std")):
            if getattr(self, avg).shape != getattr(self, inv_std).shape:
                raise ValueError(f"FittingInput.{avg} has shape {getattr(self, avg).shape} but {inv_std} "
                                 f"{getattr(self, inv_std).shape}; expected one value per parameter in each")
        if self.default_fparam is not None:
            value = np.asarray(self.default_fparam, dtype=np.float64)
            if value.shape != (self.numb_fparam,) or not np.isfinite(value).all():
                raise ValueError(f"FittingInput.default_fparam must be {self.numb_fparam} finite numbers "
                                 f"(numb_fparam), got {value.tolist()}")
            object.__setattr__(self, "default_fparam", value)
        if not isinstance(self.use_aparam_as_mask, bool):
            raise TypeError(f"FittingInput.use_aparam_as_mask must be a bool, got {self.use_aparam_as_mask!r}")

    @property
    def numb_fparam(self) -> int:
        return self.fparam_avg.size

    @property
    def numb_aparam(self) -> int:
        return self.aparam_avg.size

    @property
    def dim_case_embd(self) -> int:
        return self.case_embd.size

    @property
    def width(self) -> int:
        """Numbers appended to the descriptor: nfp + nap (0 with use_aparam_as_mask) + nce."""
        return self.numb_fparam + (0 if self.use_aparam_as_mask else self.numb_aparam) + self.dim_case_embd


@dataclass
class EnergyModel:
    """Parameters of an se_e2_a + ener model."""

    type_map: list[str]  # element name of each atom type
    descriptor: SeA  # the se_e2_a descriptor
    fitting: list[Net]  # fitting[t]: net from x (ng * m2 + fitting_input.width) to the atomic energy of type t
    bias: np.ndarray  # (ntypes,) constant atomic energy per type (bias_atom_e + out_bias)
    fitting_input: FittingInput = field(default_factory=FittingInput)  # what the nets read besides D
    # deepmd-kit's atom_ener: the types with an entry that is not None (and every type beyond the
    # list, as deepmd-kit's dpmodel reads it) have their isolated atom's output subtracted
    atom_ener: tuple = ()
    atom_exclude_types: tuple[int, ...] = ()  # atoms of these types have E_i = 0 (bias included)
    model_def_script: dict = field(default_factory=dict)  # the training input's model section, as stored
    # se_e2_a with a type embedding (minidp.type_embed): the shared nets. descriptor.nets and fitting are then
    # derived from them, folded per type (type_embed.fold), and set here whatever the caller passed
    type_embedding: TypeEmbedding | None = None

    def __post_init__(self):
        if self.type_embedding is not None:
            self._fold_type_embedding()
        self.atom_ener = tuple(self.atom_ener)
        self.atom_exclude_types = tuple(sorted({int(t) for t in self.atom_exclude_types}))
        bad = [t for t in self.atom_exclude_types if not 0 <= t < self.ntypes]
        if bad:
            raise ValueError(f"atom_exclude_types {list(self.atom_exclude_types)}: types {bad} are not among "
                             f"the {self.ntypes} types of {self.type_map}")
        n_in = self.descriptor.config.dim_out + self.fitting_input.width
        wrong = [t for t, net in enumerate(self.fitting) if net.n_in != n_in]
        if wrong:
            raise ValueError(f"fitting net of type {wrong[0]} reads {self.fitting[wrong[0]].n_in} numbers; "
                             f"expected {n_in} (descriptor {self.descriptor.config.dim_out} + fparam "
                             f"{self.fitting_input.numb_fparam} + aparam "
                             f"{0 if self.fitting_input.use_aparam_as_mask else self.fitting_input.numb_aparam}"
                             f" + case embedding {self.fitting_input.dim_case_embd})")

    def _fold_type_embedding(self) -> None:
        """descriptor.nets and fitting from the shared nets (minidp.type_embed); ValueError for what the fold
        or deepmd-kit does not have: descriptor exclusions, a type count that differs. A compressed
        descriptor keeps its tables: they tabulate these folded nets (minidp.compress)."""
        te, se, cfg = self.type_embedding, self.descriptor, self.descriptor.config
        if te.ntypes != self.ntypes or te.type_one_side != cfg.type_one_side:
            raise ValueError(f"the type embedding net reads {te.ntypes} types (type_one_side {te.type_one_side}); "
                             f"the model has {self.ntypes} (type_one_side {cfg.type_one_side})")
        if cfg.exclude_types or cfg.pair_exclude_types:
            raise ValueError("se_e2_a with a type embedding and exclude_types is not supported")
        folded = fold(te, cfg.dim_out)
        self.descriptor = replace(se, nets=folded.embedding)
        self.fitting = folded.fitting

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def vacuum(self) -> tuple[bool, ...]:
        """Per type: is the isolated atom's output F_t(x^0) subtracted (atom_ener, deepmd-kit's dpmodel rule:
        every type unless its entry is None; types beyond the list too; nothing if no entry is set)."""
        if all(e is None for e in self.atom_ener):
            return (False,) * self.ntypes
        return tuple(t >= len(self.atom_ener) or self.atom_ener[t] is not None for t in range(self.ntypes))

    @property
    def sel_type(self) -> list[int]:
        """The types whose atoms have an energy (all but atom_exclude_types; deepmd-kit's get_sel_type)."""
        return [t for t in range(self.ntypes) if t not in self.atom_exclude_types]

    def options(self) -> list[str]:
        """The fitting options this model uses, by deepmd-kit's names ([] for a plain se_e2_a + ener model)."""
        spec = self.fitting_input
        used = [("numb_fparam", spec.numb_fparam), ("numb_aparam", spec.numb_aparam),
                ("dim_case_embd", spec.dim_case_embd), ("atom_ener", any(self.vacuum)),
                ("atom_exclude_types", self.atom_exclude_types)]
        return [name for name, value in used if value] + (["type_embedding"] if self.type_embedding else [])

    def named_nets(self) -> list[tuple[tuple, Net]]:
        """Every trainable net once, with its name: ``("embedding",) + key`` for each net of
        ``descriptor.nets`` (key (tj,) with type_one_side, else (ti, tj)), then ``("fitting", t)``.

        Gradients (minidp.training.force_training) are keyed by these names. A model with a type
        embedding has no such nets of its own (they are folded from shared ones): ValueError.
        """
        if self.type_embedding is not None:
            raise ValueError("training se_e2_a with a type embedding is not supported (its nets are shared by the "
                             "types: minidp.type_embed)")
        emb = [(("embedding",) + key, net) for key, net in self.descriptor.nets.items()]
        return emb + [(("fitting", t), net) for t, net in enumerate(self.fitting)]

    def nets(self) -> list[Net]:
        """The nets of :meth:`named_nets`, in order."""
        return [net for _, net in self.named_nets()]

    def params(self) -> list[dict[str, np.ndarray]]:
        """The trainable arrays, one dict per layer of :meth:`nets` in order (what the optimizers update)."""
        return [p for net in self.nets() for p in net.params()]

    def n_params(self) -> int:
        te = self.type_embedding
        if te is not None:
            return te.net.n_params() + te.embedding.n_params() + te.fitting.n_params()
        return sum(n.n_params() for n in self.nets())

    def astype(self, dtype) -> "EnergyModel":
        """A copy whose nets (embedding and fitting) are cast to dtype: float32 is deepmd-kit's
        ``precision: float32``. davg, dstd and the bias stay float64, as deepmd-kit keeps them."""
        se = self.descriptor
        if self.type_embedding is not None:  # the folded nets follow the shared ones
            return replace(self, type_embedding=self.type_embedding.astype(dtype), bias=self.bias.copy())
        nets = EmbeddingNets(se.nets.ntypes, se.nets.type_one_side, {k: n.astype(dtype) for k, n in se.nets.items()})
        # every other field (the fitting's inputs, atom_ener, exclusions, ...) carried over as it is
        return replace(self, descriptor=replace(se, nets=nets), fitting=[n.astype(dtype) for n in self.fitting],
                       bias=self.bias.copy())

    def with_compute(self, compute: str) -> "EnergyModel":
        """The model as mixed precision trains it (deepmd-kit's ``training/mixed_precision``, compute_prec
        ``compute``): every embedding net and the fitting nets' hidden layers take their products on
        operands rounded to ``compute`` (:func:`minidp.nn.with_compute`); the fitting nets' output layer,
        the descriptor's contractions, davg/dstd and the bias stay as they are. Its gradients are the
        master weights' (this model's, which stays unchanged)."""
        se = self.descriptor
        nets = EmbeddingNets(se.nets.ntypes, se.nets.type_one_side,
                             {k: with_compute(n, compute) for k, n in se.nets.items()})
        return replace(self, descriptor=replace(se, nets=nets),
                       fitting=[with_compute(n, compute, last=False) for n in self.fitting])


def new_model(
    type_map: list[str], config: SeAConfig, fitting_neuron=(240, 240, 240),
    fitting_resnet_dt: bool = True, seed: int = 0, dtype=np.float64, fitting_dtype=None,
    fitting_activation: str = "tanh", fitting_input: FittingInput | None = None, atom_ener=(),
    atom_exclude_types=(),
) -> EnergyModel:
    """A freshly initialized model (deepmd-kit's initialization; davg = 0, dstd = 1, bias = 0).

    ``fitting_input`` (what the fitting nets read besides D: fparam, aparam, their statistics,
    default_fparam, use_aparam_as_mask), ``atom_ener`` and ``atom_exclude_types``: the fitting's
    options (:class:`EnergyModel`); each fitting net reads ng * m2 + fitting_input.width numbers.

    Training replaces davg/dstd and the bias by data statistics; tests use it as is.
    ``dtype`` is the embedding nets' precision and ``fitting_dtype`` (default: dtype)
    the fitting nets' (np.float32: deepmd-kit's descriptor and fitting_net
    ``precision: float32``, computed in float32 from the embedding's input to the
    atomic energies, see minidp.se_e2_a.embed_blocks); davg, dstd and the bias are
    float64 in any case.
    """
    fitting_dtype = dtype if fitting_dtype is None else fitting_dtype
    fitting_input = FittingInput() if fitting_input is None else fitting_input
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
    fitting = [fitting_net(config.dim_out + fitting_input.width, fitting_neuron, 1, fitting_activation, fitting_resnet_dt, fitting_dtype,
                           next(seeds))
               for _ in range(ntypes)]
    return EnergyModel(list(type_map), se, fitting, np.zeros(ntypes), fitting_input, atom_ener, atom_exclude_types)


def model_with_type_embedding(type_map: list[str], config: SeAConfig, davg: np.ndarray, dstd: np.ndarray,
                              te: TypeEmbedding, bias: np.ndarray, **options) -> EnergyModel:
    """se_e2_a with a type embedding (minidp.type_embed): the shared nets ``te``, the descriptor's davg, dstd
    (ntypes, nnei, 4), the bias (ntypes,); ``options`` are EnergyModel's other fields (fitting_input, ...).
    The per-type nets are folded from ``te`` (EnergyModel does it); ValueError for what it refuses."""
    folded = fold(te, config.dim_out)
    se = SeA(config, np.asarray(davg, dtype=np.float64), np.asarray(dstd, dtype=np.float64), folded.embedding)
    return EnergyModel(list(type_map), se, folded.fitting, np.asarray(bias, dtype=np.float64).reshape(-1),
                       type_embedding=te, **options)


# ---------------------------------------------------------------------------
# Atomic energies from descriptors
# ---------------------------------------------------------------------------


class FitParams(NamedTuple):
    """The frame and atomic parameters of a call, as given (normalized by :func:`fitting_input`)."""

    fparam: np.ndarray | None = None  # (nf, nfp), or None: the model's default_fparam
    aparam: np.ndarray | None = None  # (nf, nc, nap) for the nc centre atoms, or None


NO_PARAMS = FitParams()


def fitting_input(D: np.ndarray, spec: FittingInput, params: FitParams = NO_PARAMS) -> np.ndarray:
    r"""x_i = [D_i, (f - f_avg) * f_inv_std, (a_i - a_avg) * a_inv_std, c] (nf, nc, ng * m2 + width).

    D (nf, nc, ng * m2); f is params.fparam, or the model's default_fparam
    for every frame when it is None; a_i (left out with use_aparam_as_mask)
    params.aparam. A model without these inputs gets D itself (no copy).
    ValueError (one line) when the model needs a parameter the call lacks.
    """
    if spec.width == 0:
        return D
    nf, nc, _ = D.shape
    parts = [D]
    if spec.numb_fparam:
        f = params.fparam if params.fparam is not None else spec.default_fparam
        if f is None:
            raise ValueError(f"this model needs fparam ({spec.numb_fparam} numbers per frame, numb_fparam) and "
                             "has no default_fparam; pass fparam")
        # (nf, nc, nfp): the frame's values for each of its atoms
        parts.append(np.broadcast_to(((f - spec.fparam_avg) * spec.fparam_inv_std).reshape(-1, 1, spec.numb_fparam),
                                     (nf, nc, spec.numb_fparam)))
    if spec.numb_aparam and not spec.use_aparam_as_mask:
        if params.aparam is None:
            raise ValueError(f"this model needs aparam ({spec.numb_aparam} numbers per atom, numb_aparam); "
                             "pass aparam")
        # (nf, nc, nap)
        parts.append((params.aparam - spec.aparam_avg) * spec.aparam_inv_std)
    if spec.dim_case_embd:
        # (nf, nc, nce)
        parts.append(np.broadcast_to(spec.case_embd, (nf, nc, spec.dim_case_embd)))
    # (nf, nc, ng * m2 + width)  in D's precision, as deepmd-kit casts the fitting's inputs
    return np.concatenate(parts, axis=-1, dtype=D.dtype)


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


def fitted_groups(atom_types: np.ndarray, model: EnergyModel) -> list[tuple[int, np.ndarray, Net]]:
    """(t, atoms of type t, its fitting net) for the types present whose atoms the nets compute: the atoms of
    atom_exclude_types keep E_i = 0 and are left out."""
    return [(t, atoms, model.fitting[t]) for t, atoms in type_groups(atom_types, model.ntypes)
            if t not in model.atom_exclude_types]


def vacuum_rows(x: np.ndarray, dim: int) -> np.ndarray:
    """x^0 (nb, n_in): the fitting rows x with the descriptor part (the first dim numbers) zeroed, the
    isolated atom whose output atom_ener subtracts (its parameters and case embedding kept)."""
    # (nb, n_in)
    x0 = x.copy()
    x0[:, :dim] = 0.0
    return x0


def vacuum_output(net: Net, x: np.ndarray, dim: int) -> np.ndarray:
    """F(x^0) (nb, 1): the net on the rows x with the descriptor part zeroed (:func:`vacuum_rows`)."""
    return net_forward(net, vacuum_rows(x, dim))[0]


def atomic_energy(
    D: np.ndarray, atom_types: np.ndarray, model: EnergyModel, params: FitParams = NO_PARAMS,
) -> tuple[np.ndarray, list[FitCache]]:
    r"""E_i = F_{t_i}(x_i) [- F_{t_i}(x_i^0)] + b_{t_i}; returns E_atom (nf, nloc) and the caches.

    x_i from :func:`fitting_input`; the vacuum term only for the types
    atom_ener names (:attr:`EnergyModel.vacuum`); atoms of atom_exclude_types
    keep E_i = 0 and get no cache (their energy does not depend on anything).
    """
    nf, nloc, dim = D.shape
    # (nf, nloc, dim + width)
    x = fitting_input(D, model.fitting_input, params)
    # (nf, nloc)  float64 whatever the nets' precision: the bias and the sums over atoms (deepmd-kit's too)
    E_atom = np.zeros((nf, nloc))
    caches = []
    vacuum = model.vacuum
    for t, atoms, net in fitted_groups(atom_types, model):
        # (nb, dim + width) with nb = nf * na: every atom of type t is one row, in the net's precision
        x_t = x[:, atoms].reshape(-1, x.shape[-1]).astype(net.dtype, copy=False)
        # (nb, 1)
        y, net_caches = net_forward(net, x_t)
        if vacuum[t]:
            y = y - vacuum_output(net, x_t, dim)
        E_atom[:, atoms] = y.reshape(nf, atoms.size).astype(np.float64) + model.bias[t]
        caches.append(FitCache(t, atoms, model.fitting[t], net_caches))
    return E_atom, caches


class FitBackward(NamedTuple):
    """The fitting nets' backward (:func:`atomic_energy_backward`)."""

    dD: np.ndarray  # (nf, nloc, ng * m2) dL/dD
    cotangents: list  # per FitCache: each layer's dL/dx_l (nn.net_input_cotangents), for training to reuse


def atomic_energy_backward(dE_atom: np.ndarray, caches: list[FitCache], dim: int) -> FitBackward:
    """dL/dD (nf, nloc, ng * m2) from dL/dE_atom (nf, nloc): each type's net backward.

    Only the descriptor's part of dL/dx goes into dL/dD: the parameters and the case
    embedding are constants, and the vacuum term does not depend on D. Every layer's
    dL/dx_l is kept beside it (arrays the backward makes anyway): training's second-order
    step reuses them (minidp.training.force_training.atomic_energy_param_backward).
    """
    nf, nloc = dE_atom.shape
    # (nf, nloc, ng * m2)
    dD = np.zeros((nf, nloc, dim), dtype=dE_atom.dtype)
    cotangents = []
    for _, atoms, net, net_caches in caches:
        # (nb, 1)
        dy = dE_atom[:, atoms].reshape(-1, 1).astype(net.dtype, copy=False)
        # per layer (nb, n_in); the first is dL/dx (nb, dim + width)
        gx = net_input_cotangents(net, net_caches, dy)
        dD[:, atoms] = gx[0][:, :dim].reshape(nf, atoms.size, dim)
        cotangents.append(gx)
    return FitBackward(dD, cotangents)


def fitting_last_layer(D: np.ndarray, atom_types: np.ndarray, model: EnergyModel,
                       params: FitParams = NO_PARAMS) -> np.ndarray:
    """The fitting nets' last hidden layer (nf, nloc, neuron[-1]): each atom's net without its final
    linear layer, on x_i (deepmd-kit's eval_fitting_last_layer; every type, atom_exclude_types too)."""
    nf, nloc, _ = D.shape
    if len(model.fitting[0].layers) < 2:
        raise ValueError("the fitting nets have no hidden layer (neuron = []): there is no last layer to give")
    # (nf, nloc, dim + width)
    x = fitting_input(D, model.fitting_input, params)
    width = model.fitting[0].layers[-1].n_in
    # (nf, nloc, neuron[-1])
    out = np.zeros((nf, nloc, width), dtype=D.dtype)
    for t, atoms in type_groups(atom_types, model.ntypes):
        hidden = Net(model.fitting[t].layers[:-1])
        y, _ = net_forward(hidden, x[:, atoms].reshape(-1, x.shape[-1]))
        out[:, atoms] = y.reshape(nf, atoms.size, width)
    return out


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
    keep: bool = False, params: FitParams = NO_PARAMS, tails: dict | None = None,
) -> tuple[np.ndarray, ModelCache]:
    r"""Atomic energies E_i (nf, nc) (:func:`atomic_energy`), D from the pair displacements, and the cache.

    rij, nlist (nf, nc, nnei, ...) and atom_types (nc,) are any nc centre atoms
    (all of a frame, or a chunk of one), params their frames' and their own
    parameters. ``keep`` keeps what training needs (minidp.training.loss). Trusts its
    input (see the module docstring). ``tails``: the embedding's padded tails already made
    (minidp.se_e2_a.embed), else made here.
    """
    D, dcache = descriptor_forward(rij, nlist, atom_types, model.descriptor, backend, keep, tails)
    E_atom, fcaches = atomic_energy(D, atom_types, model, params)
    return E_atom, ModelCache(D, dcache, fcaches)


class ModelBackward(NamedTuple):
    """What :func:`model_backward` returns."""

    g: np.ndarray  # (nf, nc, nnei, 3) the pair gradients g_ij = dE/d r_ij
    fitting: FitBackward  # the fitting nets' part (dE/dD and each layer's cotangents, which training reuses)


def model_backward(cache: ModelCache, model: EnergyModel, backend: str = "numba") -> ModelBackward:
    r"""The pair gradients g_ij = dE/d r_ij (nf, nc, nnei, 3), E = sum_i E_i.

    Backward from dE/dE_i = 1 (the energy is the atomic energies' plain sum)
    through the fitting nets and the descriptor.
    """
    D = cache.D
    # dE/dD (nf, nc, ng * m2) and the layers' cotangents
    fit = atomic_energy_backward(np.ones(D.shape[:2], dtype=D.dtype), cache.fitting_caches, D.shape[-1])
    # (nf, nc, nnei, 3)
    return ModelBackward(descriptor_backward(fit.dD, cache.descriptor_cache, model.descriptor, backend), fit)


class PairGradients(NamedTuple):
    """Atomic energies and the pair gradients of nc centre atoms."""

    E_atom: np.ndarray  # (nf, nc)
    g: np.ndarray  # (nf, nc, nnei, 3)  g_ij = dE/d r_ij


def pair_gradients(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
    params: FitParams = NO_PARAMS,
) -> PairGradients:
    r"""Atomic energies E_i (nf, nc) and the pair gradients g_ij = dE/d r_ij (nf, nc, nnei, 3).

    :func:`model_forward`, then :func:`model_backward`. rij, nlist
    (nf, nc, nnei, ...) and atom_types (nc,) are any nc centre atoms (all of a
    frame, or a chunk of one), params their parameters. Trusts its input (see
    the module docstring).
    """
    E_atom, cache = model_forward(rij, nlist, atom_types, model, backend, params=params)
    return PairGradients(E_atom, model_backward(cache, model, backend).g)


def predict_frames(
    rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel, backend: str = "numba",
    params: FitParams = NO_PARAMS,
) -> Prediction:
    """Energy, forces and virials of whole frames: :func:`pair_gradients`, then :func:`pair_forces_virials`.

    rij, nlist (nf, nloc, nnei, ...), atom_types (nloc,). Trusts its input:
    :func:`energy_forces` is the checked entry.
    """
    E_atom, g = pair_gradients(rij, nlist, atom_types, model, backend, params)
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
    params: FitParams = NO_PARAMS,
) -> Prediction:
    """Energy, forces and virials of whole frames, for a caller with its own neighbour list.

    rij, nlist (nf, nloc, nnei, ...) as :func:`minidp.neighbor.build_neighbor_list`
    gives them, atom_types (nloc,), params (fparam (nf, nfp), aparam
    (nf, nloc, nap)) as the model needs them; ``backend`` is "reference", "numpy" or
    "numba" (see minidp.se_e2_a). The backend and the nlist's layout are
    checked (:func:`minidp.se_e2_a.check_descriptor_inputs`), then
    :func:`predict_frames` computes.
    """
    check_descriptor_inputs(nlist, model.descriptor, backend)
    return predict_frames(rij, nlist, atom_types, model, backend, params)


# ---------------------------------------------------------------------------
# se_e2_a with a type embedding: the formula as written (minidp.type_embed)
# ---------------------------------------------------------------------------


def tebd_reference_gradients(rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel,
                             params: FitParams = NO_PARAMS) -> PairGradients:
    r"""E_i (nf, nc) and g_ij = dE/d r_ij (nf, nc, nnei, 3) of se_e2_a with a type embedding, the shared nets
    evaluated as the formula has them (minidp.type_embed), no fold:

    E_i = F([D_i, e_{t_i}, f, a_i]) [- F([0, e_{t_i}, f, a_i])] + b_{t_i}   (0 for atom_exclude_types)

    Backward right below: dE_i = 1 through the shared fitting net to dD, then the contraction, the shared
    embedding net and the environment matrix. The fast path (any backend on the folded nets) is tested
    against this. Trusts its input, as :func:`pair_gradients`.
    """
    te, se, cfg = model.type_embedding, model.descriptor, model.descriptor.config
    R, env = env_matrix(rij, nlist, atom_types, se.davg, se.dstd, cfg.switch_start, cfg.rcut, "reference",
                        protection=cfg.env_protection, width=cfg.switch_width)
    T, tcache = type_embed.embed_reference(R, atom_types, te, cfg)
    # (nf, nc, ng * m2)
    D = contract(T, cfg.axis_neuron)
    nf, nc, dim = D.shape
    # (nf * nc, dim + ne + width)  the rows [D_i, e_{t_i}, f, a_i]
    x = fitting_rows(fitting_input(D, model.fitting_input, params), type_vectors(te.net)[atom_types],
                     dim).reshape(nf * nc, -1)
    # (nf * nc, 1)
    y, caches = net_forward(te.fitting, x)
    # (nc,) the vacuum term's atoms (atom_ener) and the atoms that have an energy
    vacuum = np.asarray(model.vacuum)[atom_types]
    counted = ~np.isin(atom_types, model.atom_exclude_types)
    # (nf, nc)
    y0 = vacuum_output(te.fitting, x, dim).reshape(nf, nc) if vacuum.any() else np.zeros((nf, nc))
    E_atom = (y.reshape(nf, nc) - np.where(vacuum, y0, 0.0) + model.bias[atom_types]) * counted
    # (nf * nc, 1)  dE/dE_i
    dy = np.broadcast_to(counted, (nf, nc)).reshape(-1, 1).astype(y.dtype)
    # (nf * nc, dim + ne + width)
    dx, _ = net_backward(te.fitting, caches, dy, param_grads=False)
    dT = contract_backward(dx[:, :dim].reshape(nf, nc, dim), T, cfg.axis_neuron)
    dR = type_embed.embed_reference_backward(dT, tcache, te)
    return PairGradients(E_atom.astype(np.float64), env_matrix_backward(dR, env, "reference"))


def tebd_reference_prediction(rij: np.ndarray, nlist: np.ndarray, atom_types: np.ndarray, model: EnergyModel,
                              params: FitParams = NO_PARAMS) -> Prediction:
    """Energy, forces and virials of whole frames by :func:`tebd_reference_gradients` (as :func:`predict_frames`)."""
    E_atom, g = tebd_reference_gradients(rij, nlist, atom_types, model, params)
    force, atom_virial = pair_forces_virials(g, rij, nlist, "reference")
    return Prediction(E_atom.sum(axis=1), force, atom_virial.sum(axis=1), E_atom, atom_virial)
