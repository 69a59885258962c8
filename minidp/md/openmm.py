r"""minidp's energy and forces in an OpenMM ``System``, through OpenMM's ``PythonForce``.

.. code-block:: python

    system = openmm.System()                       # one particle per atom, masses in Da
    force = add_minidp_force(system, "model.dp", topology_or_names, periodic=True)

Each time OpenMM needs forces it calls the force's computation with its ``State``; minidp
evaluates the model there (:class:`minidp.infer.DeepPot`) and hands back the energy and forces.
The example ``examples/openmm_water.py`` runs NVT water this way (from a clone:
``OMP_NUM_THREADS=2 python examples/openmm_water.py``, or ``--help``).

Units. OpenMM works in nm, kJ/mol and kJ/mol/nm; minidp in Angstrom, eV and eV/Angstrom:

.. math::

    \mathbf r_{\AA} = 10\,\mathbf r_{nm}, \qquad
    E_{kJ/mol} = c\,E_{eV}, \qquad
    \mathbf F_{kJ/mol/nm} = 10\,c\,\mathbf F_{eV/\AA},

(1 nm = 10 Angstrom exactly; a force is a derivative by a length, and 1/Angstrom = 10/nm), with
:math:`c = e N_A / 1000 = 96.48533212331002` kJ/mol per eV from the CODATA 2018 values
:math:`e = 1.602176634 \times 10^{-19}` C and :math:`N_A = 6.02214076 \times 10^{23}`/mol, exact
since the 2019 SI. These are the constants of deepmd-kit's data toolkit dpdata (``dpdata/unit.py``,
its ``kJ_mol`` conversion) and of OpenMM's own ``openmm.unit``, so kJ/mol mean the same on both
sides. (ASE 3.29 defaults to CODATA 2014, :math:`c = 96.48533288...`, 7.9e-9 relative away.)

Periodic boxes (``periodic=True``): OpenMM's box vectors a, b, c are minidp's cell rows as they
stand, times 10. OpenMM keeps them in its reduced triclinic form, a = (a_x, 0, 0),
b = (b_x, b_y, 0), c = (c_x, c_y, c_z) with a_x >= 2|b_x|, a_x >= 2|c_x|, b_y >= 2|c_y|; minidp
takes any cell, so nothing is converted. OpenMM may hand over positions wrapped into other
images: minidp wraps them itself, the energy is the same. The box is the Context's (set it with
``system.setDefaultPeriodicBoxVectors`` or ``context.setPeriodicBoxVectors``); a barostat
(``MonteCarloBarostat``) works, as it needs energies only. Open systems (``periodic=False``): no
box is read.

Types: by name, as minidp's ASE calculator does: each particle's element symbol (from an
``openmm.app.Topology``) or the name given in a list, looked up in the model's type map.

Precision: OpenMM's Reference platform keeps forces in double precision (energies and forces agree
with ``DeepPot.eval`` to round-off); the CPU platform accumulates them in single precision. The
computation is picklable (a module-level class holding the DeepPot), so ``XmlSerializer`` can
store the force with its model. An error raised during a step reaches the caller as an
``openmm.OpenMMException`` carrying the message.

openmm (8.5 or later, for ``PythonForce``) is an optional dependency: ``pip install openmm``, or
``pip install 'minidp[md]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from minidp import checks
from minidp.infer import DeepPot

# openmm is optional: this module imports without it (for the docs and the test collection);
# add_minidp_force then raises one line saying how to install it. The import stands here rather
# than inside a function because the per-step computation and the input checks all need it.
try:
    import openmm
    from openmm import app, unit
except ImportError as err:  # pragma: no cover - depends on the environment
    openmm = app = unit = None
    OPENMM_MISSING = f"minidp.md.openmm needs openmm (pip install openmm): {err}"
else:
    OPENMM_MISSING = (None if hasattr(openmm, "PythonForce") else
                      f"minidp.md.openmm needs openmm >= 8.5 (its PythonForce), got openmm {openmm.__version__} "
                      "(pip install -U openmm)")

# c = e N_A / 1000 (kJ/mol per eV), CODATA 2018; see the module docstring
KJ_PER_MOL_PER_EV = 1.602176634e-19 * 6.02214076e23 / 1000.0
ANGSTROM_PER_NM = 10.0


class OpenMMEnergyForces(NamedTuple):
    """What OpenMM's PythonForce takes back: the energy and the forces, in OpenMM's units."""

    energy: float  # kJ/mol
    forces: np.ndarray  # (natoms, 3) kJ/mol/nm


def energy_forces_openmm_units(dp: DeepPot, atom_types: np.ndarray, x_nm: np.ndarray,
                               box_nm: np.ndarray | None) -> OpenMMEnergyForces:
    r"""E (kJ/mol) and F_i = -dE/dr_i (kJ/mol/nm) of the model at OpenMM's positions and box.

    x_nm (natoms, 3) nm; box_nm (3, 3) nm, the box vectors as rows, or None (open boundaries).
    :math:`\mathbf r_{\AA} = 10\,\mathbf r_{nm}`, :math:`E = c\,E_{eV}`,
    :math:`\mathbf F = 10\,c\,\mathbf F_{eV/\AA}` (module docstring).
    """
    # (1, natoms, 3) Angstrom
    x = x_nm[None] * ANGSTROM_PER_NM
    # (1, 3, 3) Angstrom, lattice vectors as rows
    cell = None if box_nm is None else box_nm[None] * ANGSTROM_PER_NM
    e, f, _ = dp.eval(x, cell, atom_types)
    # (natoms, 3)
    forces = f[0] * (KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM)
    return OpenMMEnergyForces(float(e[0, 0]) * KJ_PER_MOL_PER_EV, forces)


@dataclass(frozen=True, eq=False)
class DeepPotComputation:
    """The computation a PythonForce calls: OpenMM ``State`` -> (kJ/mol, kJ/mol/nm).

    A class at module level, not a closure, so that pickle (OpenMM's XmlSerializer) can store it.
    """

    dp: DeepPot
    atom_types: np.ndarray  # (natoms,) the model's type of every particle
    periodic: bool  # read the State's box vectors (else open boundaries)

    def __post_init__(self):
        if not isinstance(self.dp, DeepPot):
            raise TypeError(f"dp must be a minidp.infer.DeepPot, got {type(self.dp).__name__}")
        checks.boolean("periodic", self.periodic)
        # (natoms,)
        types = checks.atom_types(self.atom_types, self.dp.get_ntypes())
        if types.size == 0:
            raise ValueError("atom_types is empty (a system without particles); expected one type per particle")
        object.__setattr__(self, "atom_types", types)

    def __call__(self, state) -> OpenMMEnergyForces:
        # (natoms, 3) nm; (3, 3) nm or None
        x_nm = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box_nm = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) if self.periodic else None
        return energy_forces_openmm_units(self.dp, self.atom_types, x_nm, box_nm)


# ---------------------------------------------------------------------------
# The public entry point: checks once, then the force
# ---------------------------------------------------------------------------


def particle_names(atoms) -> list[str]:
    """The name of every particle: a Topology's element symbols, or a list of names as given."""
    if app is not None and isinstance(atoms, app.Topology):
        names = []
        for atom in atoms.atoms():
            if atom.element is None:
                raise ValueError(f"atom {atom.index} ({atom.name} of residue {atom.residue.name} "
                                 f"{atom.residue.id}) has no element; minidp types atoms by element")
            names.append(atom.element.symbol)
        return names
    if isinstance(atoms, np.ndarray):
        atoms = atoms.tolist()
    if not isinstance(atoms, (list, tuple)):
        raise TypeError(f"atoms must be an openmm.app.Topology or a list of element names, "
                        f"got {type(atoms).__name__} {checks.short(atoms)}")
    for k, name in enumerate(atoms):
        if not isinstance(name, str):
            raise TypeError(f"atoms[{k}] must be an element name (a str), got {type(name).__name__} {name!r}")
    return list(atoms)


def types_by_name(names: list[str], type_map: list[str]) -> np.ndarray:
    """(natoms,) the model type of every name, or ValueError naming the unknown ones."""
    unknown = sorted(set(names) - set(type_map))
    if unknown:
        raise ValueError(f"element(s) {unknown} are not in the model's type map {type_map}")
    # (natoms,)
    return np.array([type_map.index(name) for name in names], dtype=np.int64)


def add_minidp_force(system, model, atoms, *, periodic: bool):
    r"""Add minidp's potential to ``system`` as an ``openmm.PythonForce`` (named "minidp"); return it.

    The force contributes :math:`E(\mathbf r_1, \dots, \mathbf r_N)` and
    :math:`\mathbf F_i = -\partial E / \partial \mathbf r_i` over all N particles of the system,
    converted to kJ/mol and kJ/mol/nm (module docstring).

    system : openmm.System with one particle per atom (masses are the caller's)
    model : a model file (as for DeepPot; no progress bar) or a minidp.infer.DeepPot
    atoms : an openmm.app.Topology (atoms typed by element symbol) or a list of names, one per particle
    periodic : True: the Context's box vectors are the cell; False: open boundaries
    """
    if OPENMM_MISSING:
        raise ImportError(OPENMM_MISSING)
    if not isinstance(system, openmm.System):
        raise TypeError(f"system must be an openmm.System, got {type(system).__name__}")
    periodic = checks.boolean("periodic", periodic)
    names = particle_names(atoms)
    if len(names) != system.getNumParticles():
        raise ValueError(f"atoms gives {len(names)} names but the system has {system.getNumParticles()} particles; "
                         "expected one name per particle")
    dp = model if isinstance(model, DeepPot) else DeepPot(model, progress=False)
    computation = DeepPotComputation(dp, types_by_name(names, dp.get_type_map()), periodic)
    force = openmm.PythonForce(computation)
    force.setUsesPeriodicBoundaryConditions(periodic)
    force.setName("minidp")
    system.addForce(force)
    return force
