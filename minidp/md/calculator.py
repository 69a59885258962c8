"""An ASE calculator backed by :class:`minidp.DeepPot`.

.. math::

    \\sigma = -\\frac{W}{V}

ASE's stress is minus the virial W over the cell volume V (eV/Å^3), given in
Voigt order (xx, yy, zz, yz, xz, xy). Atoms are matched to the model's types
by chemical symbol. A model with frame or atomic parameters reads them from
``atoms.info["fparam"]`` and ``atoms.info["aparam"]``, as deepmd-kit's
calculator does (any shape :meth:`minidp.infer.DeepPot.eval` takes). The energy is
a NumPy float64 scalar, as deepmd-kit's.
"""

from __future__ import annotations

import numpy as np

try:
    from ase.calculators.calculator import Calculator, all_changes
    from ase.stress import full_3x3_to_voigt_6_stress
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"minidp.md.calculator needs ASE (pip install 'minidp[tools]'): {err}") from None

from minidp.infer import DeepPot


class MiniDPCalculator(Calculator):
    """energy, free_energy, energies (per atom), forces, stress (periodic cells only)."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, **kwargs):
        """``model``: a path to a model file, or a DeepPot; ``neighbor_list``: an ASE neighbour list the
        DeepPot made from the path evaluates with (deepmd-kit's calculator takes it too)."""
        mine = ("batch_size", "workers", "neighbor_list")
        super().__init__(**{k: v for k, v in kwargs.items() if k not in mine})
        self.dp = model if isinstance(model, DeepPot) else DeepPot(
            model, batch_size=kwargs.get("batch_size"), workers=kwargs.get("workers"),
            neighbor_list=kwargs.get("neighbor_list"))
        self.type_map = self.dp.get_type_map()

    def atom_types(self, atoms) -> np.ndarray:
        """The model's type index of every atom, by chemical symbol."""
        symbols = atoms.get_chemical_symbols()
        unknown = sorted(set(symbols) - set(self.type_map))
        if unknown:
            raise ValueError(f"element(s) {unknown} are not in the model's type map {self.type_map}")
        # (natoms,)  int even for no atoms ([] alone would be float64)
        return np.array([self.type_map.index(s) for s in symbols], dtype=np.int64)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.any())
        if periodic and not self.atoms.pbc.all():
            raise ValueError(f"pbc={self.atoms.pbc.tolist()}: minidp handles fully periodic or open systems only")
        cell = self.atoms.cell.array[None] if periodic else None
        e, f, v, ae, _ = self.dp.eval(self.atoms.positions[None], cell, self.atom_types(self.atoms), atomic=True,
                                      fparam=self.atoms.info.get("fparam"), aparam=self.atoms.info.get("aparam"))
        self.results = {
            "energy": e[0, 0], "free_energy": e[0, 0],
            "energies": ae[0, :, 0], "forces": f[0],
        }
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(-v[0].reshape(3, 3) / self.atoms.get_volume())
