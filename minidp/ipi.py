r"""``minidp ipi``: a force client for i-PI, in the place of deepmd-kit's ``dp_ipi``.

i-PI (path integrals, thermostats, replica exchange) moves the nuclei and asks a client for
energies and forces over a socket. ``minidp ipi -m MODEL --unix NAME -c INIT.xyz`` (or
``--host H --port P``; or deepmd-kit's ``dp_ipi`` JSON input, ``minidp ipi input.json``) connects
to the server and serves minidp's energy, forces and virial until the server ends.

The protocol (i-PI's "socket" driver protocol): the server sends 12-character headers, padded
with spaces; numbers are native doubles and 32-bit ints, in atomic units (Bohr, Hartree).

- ``STATUS`` -> the client answers ``READY`` (no data), ``HAVEDATA`` (forces computed) or
  ``NEEDINIT``;
- ``INIT`` + int32 bead index + int32 length + that many bytes: initialization (ignored here);
- ``POSDATA`` + the cell h (9 doubles, the lattice vectors as columns, row-major) + its inverse
  (9) + int32 natoms + positions (3 natoms): the client evaluates;
- ``GETFORCE`` -> ``FORCEREADY`` + energy + int32 natoms + forces (3 natoms) + virial (9, the
  transpose of minidp's W_ab, as dp_ipi sends it) + int32 length + extra string;
- ``EXIT``, or the server closing the socket: the client ends.

A UNIX socket named NAME is the file ``/tmp/ipi_NAME``, as i-PI and dp_ipi name it.

Units: positions and the cell arrive in Bohr and leave minidp in Angstrom; energies and the
virial go back in Hartree, forces in Hartree/Bohr. The conversion factors are dp_ipi's
(Bohr = 0.52917721 Angstrom, Hartree = 27.21138602 eV, CODATA 2014 cut to 8 and 10 digits), so
that the same i-PI input driven by dp_ipi and by minidp ipi gives the same trajectory; they
differ from ASE's unrounded CODATA values by about 1e-9 relative.

Atom types: by the element names of INIT.xyz, looked up in the model's type map (with a dp_ipi
JSON, by its ``atom_type`` table, as dp_ipi does).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# dp_ipi's conversion factors (see the module docstring)
BOHR = 0.52917721  # Angstrom per Bohr
HARTREE = 27.21138602  # eV per Hartree
HEADER = 12


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is, the model, and the element of every atom."""

    model: str
    elements: tuple[str, ...]
    unix: str | None = None
    host: str = "localhost"
    port: int = 31415
    type_table: dict | None = None  # dp_ipi's atom_type {element: model type}, else the model's type map

    def __post_init__(self):
        if not self.elements:
            raise ValueError("the initial configuration has no atoms")
        if self.unix is None and not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")


def read_xyz_elements(path) -> tuple[str, ...]:
    """The element names of an xyz file's first frame (i-PI's init.xyz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"initial configuration {path} does not exist")
    lines = path.read_text().splitlines()
    try:
        natoms = int(lines[0].split()[0])
        names = tuple(line.split()[0] for line in lines[2:2 + natoms])
    except (IndexError, ValueError):
        raise ValueError(f"{path} is not an xyz file (atom count, comment, then 'element x y z' lines)") from None
    if len(names) != natoms:
        raise ValueError(f"{path} announces {natoms} atoms but holds {len(names)}")
    return names


def config_from_dp_ipi_json(path) -> ClientConfig:
    """deepmd-kit's dp_ipi input: graph_file, coord_file, atom_type, use_unix, host, port."""
    path = Path(path)
    data = json.loads(path.read_text())
    missing = [k for k in ("graph_file", "coord_file", "atom_type") if k not in data]
    if missing:
        raise ValueError(f"{path}: dp_ipi input lacks {', '.join(missing)}")
    unix = data["host"] if data.get("use_unix") else None
    return ClientConfig(model=data["graph_file"], elements=read_xyz_elements(data["coord_file"]), unix=unix,
                        host=data.get("host", "localhost"), port=int(data.get("port", 31415)),
                        type_table=dict(data["atom_type"]))


def atom_types(config: ClientConfig, type_map: list[str]) -> np.ndarray:
    """The model type of every atom, by element name (ValueError naming an unknown element)."""
    table = config.type_table or {name: t for t, name in enumerate(type_map)}
    unknown = sorted(set(config.elements) - set(table))
    if unknown:
        raise ValueError(f"element(s) {unknown} of the initial configuration are not in "
                         f"{'atom_type' if config.type_table else 'the model type map'} {sorted(table)}")
    return np.array([table[e] for e in config.elements])


# ---------------------------------------------------------------------------
# The evaluation, in i-PI's units
# ---------------------------------------------------------------------------


def evaluate_atomic_units(dp, h_bohr: np.ndarray, x_bohr: np.ndarray, types: np.ndarray):
    r"""(energy Ha, forces (natoms, 3) Ha/Bohr, virial (9,) Ha) for i-PI's cell h (columns: lattice vectors) and positions.

    cell rows = h^T (Angstrom) = h^T * BOHR; x = x_bohr * BOHR; E / HARTREE; F * BOHR / HARTREE;
    the virial as dp_ipi sends it: W^T / HARTREE.
    """
    # (3, 3) lattice vectors as rows, (natoms, 3)
    cell = h_bohr.T * BOHR
    x = x_bohr * BOHR
    e, f, v = dp.eval(x[None], cell[None], types)
    # (3, 3) -> (9,)
    virial = v[0].reshape(3, 3).T.reshape(9) / HARTREE
    return float(e[0, 0]) / HARTREE, f[0] / (HARTREE / BOHR), virial


# ---------------------------------------------------------------------------
# The socket protocol
# ---------------------------------------------------------------------------


def connect(config: ClientConfig) -> socket.socket:
    """A connected socket: UNIX /tmp/ipi_<name>, or TCP host:port."""
    if config.unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"/tmp/ipi_{config.unix}"
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (config.host, config.port)
    try:
        sock.connect(address)
    except OSError as err:
        raise ValueError(f"cannot reach the i-PI server at {address}: {err}") from None
    return sock


def receive(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes (EOFError when the server has gone)."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError("the i-PI server closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_header(sock: socket.socket, word: str) -> None:
    sock.sendall(word.ljust(HEADER).encode())


def forceready_message(energy: float, forces: np.ndarray, virial: np.ndarray) -> bytes:
    """FORCEREADY, energy, natoms, forces (natoms * 3), virial (9), and an empty extra string."""
    natoms = forces.shape[0]
    return (b"FORCEREADY".ljust(HEADER) + struct.pack("d", energy) + struct.pack("i", natoms)
            + np.ascontiguousarray(forces, dtype=np.float64).tobytes()
            + np.ascontiguousarray(virial, dtype=np.float64).tobytes() + struct.pack("i", 0))


def serve(sock: socket.socket, dp, types: np.ndarray, verbose: bool = False) -> int:
    """Answer the server until EXIT or until it closes the socket; returns the number of evaluations."""
    reply, evaluations = None, 0
    while True:
        try:
            word = receive(sock, HEADER).decode().strip()
        except EOFError:
            return evaluations
        if verbose:
            print(f"# i-PI: {word}", file=sys.stderr)
        if word == "STATUS":
            send_header(sock, "HAVEDATA" if reply is not None else "READY")
        elif word == "INIT":
            _bead, length = struct.unpack("ii", receive(sock, 8))
            receive(sock, length)
        elif word == "POSDATA":
            # (3, 3) row-major h, its inverse (unused)
            h = np.frombuffer(receive(sock, 72), dtype=np.float64).reshape(3, 3)
            receive(sock, 72)
            natoms = struct.unpack("i", receive(sock, 4))[0]
            if natoms != types.size:
                raise ValueError(f"the server sent {natoms} atoms; the initial configuration has {types.size}")
            # (natoms, 3)
            x = np.frombuffer(receive(sock, 24 * natoms), dtype=np.float64).reshape(natoms, 3)
            reply = forceready_message(*evaluate_atomic_units(dp, h, x, types))
            evaluations += 1
        elif word == "GETFORCE":
            if reply is None:
                raise ValueError("the i-PI server asked for forces before sending positions")
            sock.sendall(reply)
            reply = None
        elif word == "EXIT":
            return evaluations
        else:
            raise ValueError(f"unexpected message {word!r} from the i-PI server")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(p) -> None:
    """The options of ``minidp ipi``."""
    p.add_argument("input", nargs="?", default=None, help="deepmd-kit's dp_ipi JSON input (instead of the options)")
    p.add_argument("-m", "--model", default=None, help="model file (.dp, .yaml, .json; .pb/.pth with deepmd-kit)")
    p.add_argument("-c", "--coord", default=None, help="initial configuration (xyz): the element of every atom")
    p.add_argument("--unix", default=None, metavar="NAME", help="UNIX socket /tmp/ipi_NAME (i-PI's <address>)")
    p.add_argument("--host", default="localhost", help="TCP host (default localhost)")
    p.add_argument("--port", type=int, default=31415, help="TCP port (default 31415)")
    p.add_argument("--verbose", action="store_true", help="print every message of the server")


def config_from_args(args) -> ClientConfig:
    if args.input is not None:
        return config_from_dp_ipi_json(args.input)
    if args.model is None or args.coord is None:
        raise ValueError("give a dp_ipi JSON input, or -m MODEL and -c INIT.xyz")
    return ClientConfig(model=args.model, elements=read_xyz_elements(args.coord), unix=args.unix,
                        host=args.host, port=args.port)


def run_client(args) -> int:
    """Load the model, connect, serve; returns the number of evaluations."""
    from minidp.infer import DeepPot

    config = config_from_args(args)
    dp = DeepPot(config.model, progress=False)
    types = atom_types(config, dp.get_type_map())
    with connect(config) as sock:
        n = serve(sock, dp, types, verbose=args.verbose)
    print(f"minidp ipi: served {n} evaluations of {types.size} atoms", file=sys.stderr)
    return n
