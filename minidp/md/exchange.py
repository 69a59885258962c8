r"""Ghost atoms' forces sent back to the MPI ranks that own them (LAMMPS's reverse communication, by atom ID).

In LAMMPS every MPI rank owns the atoms of its subdomain (the local atoms, rows 0..nloc-1) and holds
copies of the atoms within the ghost cutoff of it (the ghost atoms, rows nloc..nall-1): other ranks'
atoms, and periodic images, of its own atoms too. A rank that evaluates only its own centres
(:meth:`minidp.infer.DeepPot.eval_extended`) leaves forces and atomic virials on ghost rows as well;
the force on an atom a is the sum over all its copies, on every rank,

.. math::

    \mathbf F_a = \sum_{\text{ranks}} \sum_{k:\ \mathrm{tag}(k) = a} \mathbf F_k ,

and likewise its atomic virial. LAMMPS makes that sum for its own pair styles (``comm->reverse_comm``),
but ``fix external`` takes local rows only, after it; so minidp makes it here, by the atoms' IDs (tags):

- :func:`plan_exchange` (collective, and made again only when some rank's atoms change, i.e. after
  LAMMPS re-neighbours): the owner of every ghost (every rank's local tags, gathered once), the ghost
  rows each rank sends to each owner grouped per atom (an atom seen as several ghosts on one rank is
  sent once, pre-summed), and the local rows each incoming message adds onto (an all-to-all tells
  every owner once which atoms it will receive, in which order).
- :func:`reverse_sum` (every step): sums the ghost rows per atom, sends every owner its atoms'
  sums (point-to-point, only between ranks that share ghosts), adds the images of the rank's own
  atoms locally, then the incoming messages in ascending rank order: a fixed order, so a run
  repeats itself bit for bit.
- :func:`sum_over_ranks`: a short vector (a rank's energy and virial shares) summed over the ranks,
  the same bits on every rank (each rank adds the gathered rows in rank order; an all-reduce does
  not promise identical results on every rank).

``comm`` is an mpi4py communicator (from LAMMPS's, see :mod:`minidp.md.lammps`) or None for one rank:
then every ghost is an image of a local atom and no MPI is used. Shape symbols: ``nloc`` local atoms,
``nall`` local plus ghost atoms, ``m`` ghost rows bound for one rank, ``n`` atoms in one message,
``k`` values per row (3 force components, 9 of the virial, ...), ``P`` ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# the MPI message tag of the ghost sums (on a communicator of minidp's own, so no other message can match)
MESSAGE_TAG = 24


class Outgoing(NamedTuple):
    """The ghost rows bound for one rank, grouped per atom: entry e of the message is the sum of
    ``rows[starts[e]:starts[e + 1]]`` (the last group runs to the end), atoms in ascending tag order."""

    rank: int
    rows: np.ndarray  # (m,) ghost rows, grouped by atom
    starts: np.ndarray  # (n,) where each atom's group starts in rows


class Incoming(NamedTuple):
    """A message from one rank: its n entries add onto these local rows (distinct)."""

    rank: int
    local: np.ndarray  # (n,)


class ExchangePlan(NamedTuple):
    """Who sends which ghost sums to whom, for one arrangement of the atoms over the ranks."""

    nloc: int
    tags: np.ndarray  # (nall,) the atom IDs the plan was made for
    own_out: Outgoing  # images of this rank's own atoms ...
    own_in: Incoming  # ... and the local rows they add onto
    outgoing: tuple[Outgoing, ...]  # to the other ranks, ascending rank
    incoming: tuple[Incoming, ...]  # from the other ranks, ascending rank


def group_rows(rows: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by atom: (rows reordered (m,), group starts (n,), the n atoms' tags ascending).
    Within a group the rows keep their order, so a group's sum is always taken in the same order."""
    order = np.argsort(tags, kind="stable")
    # (m,)
    sorted_tags = tags[order]
    # (n,)
    starts = np.flatnonzero(np.r_[True, sorted_tags[1:] != sorted_tags[:-1]]) if tags.size else np.zeros(0, int)
    return rows[order], starts, sorted_tags[starts]


def segment_sum(values: np.ndarray, out: Outgoing) -> np.ndarray:
    """The message to out.rank: (n, k), entry e = sum of values over the rows of group e."""
    if out.starts.size == 0:
        return np.zeros((0, values.shape[1]))
    return np.add.reduceat(values[out.rows], out.starts, axis=0)


def local_rows(local_tags: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The local rows holding the atoms ``wanted`` (tags); RuntimeError if one is not local here
    (the ranks would disagree about who owns an atom: the forces would be wrong, so stop)."""
    order = np.argsort(local_tags)
    # (nloc,)
    sorted_tags = local_tags[order]
    # (n,)
    pos = np.searchsorted(sorted_tags, wanted)
    found = pos < sorted_tags.size
    found[found] = sorted_tags[pos[found]] == wanted[found]
    if not found.all():
        raise RuntimeError(f"atom ID {int(wanted[~found][0])} was sent here for summing but is not a local atom")
    return order[pos]


def owner_map(local_tags: np.ndarray, comm) -> np.ndarray:
    """owner[tag] = the rank that owns atom ``tag`` (-1: no such atom), from every rank's local tags.
    Collective: O(natoms) integers per rank, once per plan."""
    if comm is None:
        counts, all_tags = np.array([local_tags.size]), local_tags
    else:
        counts = np.array(comm.allgather(local_tags.size))
        # (natoms,)
        all_tags = np.empty(counts.sum(), dtype=np.int64)
        comm.Allgatherv(np.ascontiguousarray(local_tags, dtype=np.int64), [all_tags, counts])
    # (max tag + 1,)
    owner = np.full(int(all_tags.max()) + 1 if all_tags.size else 1, -1)
    owner[all_tags] = np.repeat(np.arange(counts.size), counts)
    return owner


def plan_exchange(tags: np.ndarray, nloc: int, comm=None) -> ExchangePlan:
    """The plan for a rank's atoms: tags (nall,) of its local then ghost atoms. Collective (every rank
    calls it at once, also a rank without atoms). ValueError if the atoms carry no IDs."""
    tags = np.asarray(tags, dtype=np.int64)
    me = 0 if comm is None else comm.Get_rank()
    nranks = 1 if comm is None else comm.Get_size()
    if tags.size and tags.min() <= 0:
        raise ValueError("the atoms have no IDs (atom_modify id no): minidp sums the ghost atoms' forces by ID")
    owner = owner_map(tags[:nloc], comm)
    # (nall - nloc,)
    ghost = np.arange(nloc, tags.size)
    # the owner of every ghost atom (-1: an ID no rank has)
    ghost_owner = np.full(ghost.size, -1)
    known = tags[ghost] < owner.size
    ghost_owner[known] = owner[tags[ghost][known]]
    if (ghost_owner < 0).any():
        raise RuntimeError(f"ghost atom ID {int(tags[ghost][ghost_owner < 0][0])} is owned by no rank")
    sends, atoms = {}, [np.zeros(0, dtype=np.int64)] * nranks
    for rank in np.unique(ghost_owner).tolist():
        rows = ghost[ghost_owner == rank]
        rows, starts, atoms[rank] = group_rows(rows, tags[rows])
        sends[rank] = Outgoing(rank, rows, starts)
    # the atoms every rank will receive from every other, in message order (once per plan)
    received = [atoms[me]] * nranks if comm is None else comm.alltoall(atoms)
    own_out = sends.pop(me, Outgoing(me, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
    return ExchangePlan(
        nloc, tags, own_out, Incoming(me, local_rows(tags[:nloc], atoms[me])),
        tuple(sends[r] for r in sorted(sends)),
        tuple(Incoming(r, local_rows(tags[:nloc], np.asarray(received[r], dtype=np.int64)))
              for r in range(nranks) if r != me and len(received[r])))


def is_current(plan: ExchangePlan | None, tags: np.ndarray, nloc: int) -> bool:
    """Whether ``plan`` was made for these atoms (same local count, same IDs in the same rows)."""
    return plan is not None and plan.nloc == nloc and np.array_equal(plan.tags, tags)


def reverse_sum(values: np.ndarray, plan: ExchangePlan, comm=None) -> np.ndarray:
    """values (nall, k) on local and ghost rows -> (nloc, k): every atom's rows summed onto its owner's
    local row (module docstring). Collective among the ranks that share ghosts."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    k = values.shape[1]
    # (nloc, k)
    out = values[:plan.nloc].copy()
    # (n, k) per incoming message
    inboxes = [np.empty((inc.local.size, k)) for inc in plan.incoming]
    requests = [comm.Irecv(box, source=inc.rank, tag=MESSAGE_TAG) for inc, box in zip(plan.incoming, inboxes)]
    # (n, k) per outgoing message; kept alive until sent
    outboxes = [segment_sum(values, o) for o in plan.outgoing]
    requests += [comm.Isend(box, dest=o.rank, tag=MESSAGE_TAG) for o, box in zip(plan.outgoing, outboxes)]
    # the images of this rank's own atoms, while the messages travel
    out[plan.own_in.local] += segment_sum(values, plan.own_out)
    for request in requests:
        request.Wait()
    for inc, box in zip(plan.incoming, inboxes):
        out[inc.local] += box
    return out


def sum_over_ranks(row: np.ndarray, comm=None) -> np.ndarray:
    """sum over the ranks of ``row`` (r,), identical bits on every rank (each adds the P gathered rows in
    rank order)."""
    row = np.ascontiguousarray(row, dtype=np.float64)
    if comm is None:
        return row.copy()
    # (P, r)
    rows = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, rows)
    return rows.sum(axis=0)
