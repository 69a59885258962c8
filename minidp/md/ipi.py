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
- ``EXIT``, or the server closing the socket between two messages: the client ends (exit 0).

A message cut short by the server closing (a header of 3 bytes, half the positions), a size out of
bounds (an INIT string beyond MAX_INIT_BYTES, an atom count other than the initial
configuration's) or an unknown header stop the client with one line naming what was expected
(:class:`ProtocolError`, exit 2).

A UNIX socket named NAME is the file ``/tmp/ipi_NAME``, as i-PI and dp_ipi name it.

Units: positions and the cell arrive in Bohr and leave minidp in Angstrom; energies and the
virial go back in Hartree, forces in Hartree/Bohr. The conversion factors are dp_ipi's
(Bohr = 0.52917721 Angstrom, Hartree = 27.21138602 eV, CODATA 2014 cut to 8 and 10 digits), so
that the same i-PI input driven by dp_ipi and by minidp ipi gives the same trajectory; they
differ from ASE's unrounded CODATA values by about 1e-9 relative.

Atom types: by the element names of INIT.xyz, looked up in the model's type map (with a dp_ipi
JSON, by its ``atom_type`` table, as dp_ipi does). A dp_ipi JSON is read as dp_ipi reads it: an
object whose values have the JSON types dp_ipi expects (``atom_type`` an object such as
``{"O": 0, "H": 1}``, not a list; ``port`` an integer); any other value is refused by key.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from dataclasses import dataclass

import numpy as np

from minidp import checks
from minidp.infer import DeepPot

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
    verbose: bool = False

    def __post_init__(self):
        if not self.elements:
            raise ValueError("the initial configuration has no atoms")
        port = checks.integer("port", self.port, lo=0)
        if self.unix is None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")


def read_xyz_elements(path) -> tuple[str, ...]:
    """The element names of an xyz file's first frame (i-PI's init.xyz)."""
    lines = checks.read_text(path, "initial configuration").splitlines()
    try:
        natoms = int(lines[0].split()[0])
        names = tuple(line.split()[0] for line in lines[2:2 + natoms])
    except (IndexError, ValueError):
        raise ValueError(f"{path} is not an xyz file (atom count, comment, then 'element x y z' lines)") from None
    if len(names) != natoms:
        raise ValueError(f"{path} announces {natoms} atoms but holds {len(names)}")
    return names


# dp_ipi's keys, each required by dp_ipi (minidp gives the last four defaults) and of one JSON type
DP_IPI_DEFAULTS = {"use_unix": False, "host": "localhost", "port": 31415, "verbose": False}


def read_json_object(path, what: str) -> dict:
    """A JSON file holding an object {...}; one line naming the file otherwise (syntax error, not text, ...)."""
    text = checks.read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") \
            from None
    if not isinstance(data, dict):
        raise checks.InputTypeError(f"{what} {path} holds a JSON {type(data).__name__} {checks.short(data)}; expected an "
                         "object of keys, {\"graph_file\": ..., \"coord_file\": ..., \"atom_type\": ...}")
    return data


def _string(where: str, value) -> str:
    """A non-empty string from a JSON input (a file name, a host)."""
    if not isinstance(value, str) or not value:
        raise checks.InputTypeError(f"{where}: expected a non-empty string, got {type(value).__name__} "
                                    f"{checks.short(value)}")
    return value


def _type_table(where: str, value) -> dict:
    """dp_ipi's atom_type: an object of element names to model types, {"O": 0, "H": 1} (as dp_ipi, no list)."""
    if not isinstance(value, dict) or not value:
        raise checks.InputTypeError(f"{where}: expected an object of element names to model types, "
                                    f'e.g. {{"O": 0, "H": 1}}, got {type(value).__name__} {checks.short(value)}')
    return {name: checks.integer(f"{where}.{name}", t, lo=0) for name, t in value.items()}


def config_from_dp_ipi_json(path) -> ClientConfig:
    """deepmd-kit's dp_ipi input: graph_file, coord_file, atom_type, use_unix, host, port, verbose.

    Each value has the JSON type dp_ipi reads (its port an integer: 31998.7 is refused, not cut);
    use_unix, host, port and verbose may be left out (defaults DP_IPI_DEFAULTS).
    """
    data = read_json_object(path, "dp_ipi input")
    missing = [k for k in ("graph_file", "coord_file", "atom_type") if k not in data]
    if missing:
        raise ValueError(f"{path}: dp_ipi input lacks {', '.join(missing)}")
    value = {**DP_IPI_DEFAULTS, **data}
    model, coord = (_string(f"{path}: {k}", value[k]) for k in ("graph_file", "coord_file"))
    table = _type_table(f"{path}: atom_type", value["atom_type"])
    use_unix = checks.boolean(f"{path}: use_unix", value["use_unix"])
    host = _string(f"{path}: host", value["host"])
    port = checks.integer(f"{path}: port", value["port"], lo=0)
    verbose = checks.boolean(f"{path}: verbose", value["verbose"])
    return checks.validated(str(path), ClientConfig, model=model, elements=read_xyz_elements(coord),
                            unix=host if use_unix else None, host=host, port=port, type_table=table,
                            verbose=verbose)


def atom_types(config: ClientConfig, type_map: list[str]) -> np.ndarray:
    """The model type of every atom, by element name (ValueError naming an unknown element)."""
    table = config.type_table or {name: t for t, name in enumerate(type_map)}
    unknown = sorted(set(config.elements) - set(table))
    if unknown:
        raise ValueError(f"element(s) {unknown} of the initial configuration are not in "
                         f"{'atom_type' if config.type_table else 'the model type map'} {sorted(table)}")
    beyond = {name: table[name] for name in config.elements if table[name] >= len(type_map)}
    if beyond:
        name, t = next(iter(beyond.items()))
        raise ValueError(f"atom_type {name}: {t} is not a type of the model, whose types are 0..{len(type_map) - 1} "
                         f"({' '.join(type_map)})")
    # (natoms,)
    return np.array([table[e] for e in config.elements], dtype=np.int64)


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


class ProtocolError(ValueError):
    """The i-PI server broke the protocol: a message cut short, a size out of bounds, an unknown header."""


# INIT's string is short (i-PI sends the bead's parameters, a few hundred bytes; dp_ipi reads it into
# 2048 bytes); a larger announced length is a broken server, not a buffer to allocate
MAX_INIT_BYTES = 1 << 16
# recv(n) allocates n bytes up front: read at most this much at a time
RECV_CHUNK = 1 << 20


def receive(sock: socket.socket, n: int, what: str, start: bytes = b"") -> bytes:
    """Exactly n bytes of ``what``, the first ones ``start`` (ProtocolError naming it when the server
    closes the connection first)."""
    chunks, got = [start], len(start)
    while got < n:
        chunk = sock.recv(min(n - got, RECV_CHUNK))
        if not chunk:
            raise ProtocolError(f"the i-PI server closed the connection after {got} of the {n} bytes of {what}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive_header(sock: socket.socket) -> str | None:
    """The next message's 12-character header, or None if the server closed the connection between messages.

    A header cut short (1 to 11 bytes, then the end) is a protocol error, not the end of the run.
    """
    first = sock.recv(HEADER)
    if not first:
        return None
    raw = receive(sock, HEADER, "a message header", start=first)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ProtocolError(f"the i-PI server sent {raw!r} where a message header (12 ASCII characters) "
                            "was expected") from None


def send_header(sock: socket.socket, word: str) -> None:
    sock.sendall(word.ljust(HEADER).encode())


def forceready_message(energy: float, forces: np.ndarray, virial: np.ndarray) -> bytes:
    """FORCEREADY, energy, natoms, forces (natoms * 3), virial (9), and an empty extra string."""
    natoms = forces.shape[0]
    return (b"FORCEREADY".ljust(HEADER) + struct.pack("d", energy) + struct.pack("i", natoms)
            + np.ascontiguousarray(forces, dtype=np.float64).tobytes()
            + np.ascontiguousarray(virial, dtype=np.float64).tobytes() + struct.pack("i", 0))


def receive_init(sock: socket.socket) -> None:
    """INIT's bead index, length and string (read and dropped: minidp needs no initialization)."""
    _bead, length = struct.unpack("ii", receive(sock, 8, "INIT's bead index and length"))
    if not 0 <= length <= MAX_INIT_BYTES:
        raise ProtocolError(f"the i-PI server announced an INIT string of {length} bytes; expected 0..{MAX_INIT_BYTES}")
    receive(sock, length, "INIT's string")


def receive_positions(sock: socket.socket, natoms_expected: int) -> tuple[np.ndarray, np.ndarray]:
    """POSDATA's cell h (3, 3) and positions (natoms, 3), in Bohr; the atom count must be the client's."""
    # (3, 3) row-major h; its inverse is not used
    h = np.frombuffer(receive(sock, 72, "POSDATA's cell"), dtype=np.float64).reshape(3, 3)
    receive(sock, 72, "POSDATA's inverse cell")
    natoms = struct.unpack("i", receive(sock, 4, "POSDATA's atom count"))[0]
    if natoms != natoms_expected:
        raise ProtocolError(f"the i-PI server sent {natoms} atoms; the initial configuration has {natoms_expected}")
    # (natoms, 3)
    x = np.frombuffer(receive(sock, 24 * natoms, "POSDATA's positions"), dtype=np.float64).reshape(natoms, 3)
    return h, x


def serve(sock: socket.socket, dp, types: np.ndarray, verbose: bool = False) -> int:
    """Answer the server until EXIT or until it closes the socket between messages; returns the number of
    evaluations. A message cut short or out of bounds raises ProtocolError."""
    reply, evaluations = None, 0
    while True:
        word = receive_header(sock)
        if word is None or word == "EXIT":
            return evaluations
        if verbose:
            print(f"# i-PI: {word}", file=sys.stderr)
        if word == "STATUS":
            send_header(sock, "HAVEDATA" if reply is not None else "READY")
        elif word == "INIT":
            receive_init(sock)
        elif word == "POSDATA":
            h, x = receive_positions(sock, types.size)
            reply = forceready_message(*evaluate_atomic_units(dp, h, x, types))
            evaluations += 1
        elif word == "GETFORCE":
            if reply is None:
                raise ProtocolError("the i-PI server asked for forces before sending positions")
            sock.sendall(reply)
            reply = None
        else:
            raise ProtocolError(f"unexpected message {word!r} from the i-PI server; expected STATUS, INIT, "
                                "POSDATA, GETFORCE or EXIT")


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
                        host=args.host, port=args.port, verbose=args.verbose)


def run_client(args) -> int:
    """Load the model, connect, serve; returns the number of evaluations."""

    config = config_from_args(args)
    dp = DeepPot(config.model, progress=False)
    types = atom_types(config, dp.get_type_map())
    with connect(config) as sock:
        try:
            n = serve(sock, dp, types, verbose=args.verbose or config.verbose)
        except ConnectionError as err:  # reset by the server: one line, as a message cut short
            raise ProtocolError(f"the connection to the i-PI server broke: {err}") from None
    print(f"minidp ipi: served {n} evaluations of {types.size} atoms", file=sys.stderr)
    return n
