"""Running the same MD in LAMMPS and i-PI with deepmd-kit's engines and with minidp's, and reading the results.

Shared by the MD cross-check (:mod:`validation.md_crosscheck`), its tests and the MD benchmark
(:mod:`benchmarks.md`). Every run is a subprocess in its own folder:

- LAMMPS, deepmd-kit: ``lmp -in DECK -var pair deepmd -var model X.pb``;
- LAMMPS, minidp: ``python -m minidp lammps DECK -v pair minidp -v model X.dp``;
  both optionally under ``mpirun -np N``;
- i-PI: ``i-pi input.xml`` as the server, with ``dp_ipi input.json`` or ``python -m minidp ipi``
  as its force client on a UNIX socket.

The decks write thermo (pe, press, ...) every step with 16 digits and, at the end, a dump of
id, type, x, y, z, vx, vy, vz sorted by id (also 16 digits) with the box.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# LAMMPS
# ---------------------------------------------------------------------------

DECK_HEAD = """# water, {ensemble}: `pair_style ${{pair}} ${{model}}` is deepmd or minidp
variable pair index minidp
variable model index model.dp
units metal
boundary p p p
atom_style atomic
neighbor 2.0 bin
neigh_modify every 10 delay 0 check no
read_data {data}
replicate {na} {nb} {nc}
velocity all create 330.0 23456789
pair_style ${{pair}} ${{model}}
pair_coeff * * O H
timestep 0.0005
thermo_style custom step pe press ke etotal pxx pyy pzz pxy pxz pyz vol
thermo_modify format float %22.15e norm no
thermo {thermo}
"""

ENSEMBLES = {
    "nve": "fix 1 all nve\n",
    # a triclinic cell (tilts added first, atoms remapped), all six stress components coupled
    "npt": ("change_box all xy final 0.6 xz final 0.4 yz final 0.8 remap units box\n"
            "fix 1 all npt temp 330.0 330.0 0.05 tri 1.0 1.0 0.5\n"),
}

DECK_TAIL = """run {steps}
write_dump all custom final.dump id type x y z vx vy vz modify format float %22.15e sort id
"""


def with_second_model(deck: str, out_freq: int) -> str:
    """The deck with two models (${model} drives, ${model2} joins) and the deviation every out_freq steps in devi.out."""
    return deck.replace("pair_style ${pair} ${model}\n",
                        f"pair_style ${{pair}} ${{model}} ${{model2}} out_file devi.out out_freq {out_freq}\n")


def read_devi(path: Path) -> np.ndarray:
    """The plugin's model-deviation file as (nrows, 7): step, then max/min/avg of the virial and force deviations."""
    return np.loadtxt(path, comments="#", ndmin=2)


def write_water_data(system: Path, path: Path) -> Path:
    """The first frame of a deepmd/npy water system (types O, H) as a LAMMPS data file (triclinic form)."""
    import dpdata

    dpdata.System(str(system), fmt="deepmd/npy")[0].to("lammps/lmp", str(path))
    return path


def lammps_deck(ensemble: str, steps: int, data: str, replicate=(1, 1, 1), thermo: int = 1) -> str:
    """The deck text: water from ``data`` replicated, 330 K velocities, 0.5 fs steps, then the ensemble."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {sorted(ENSEMBLES)}, got {ensemble!r}")
    na, nb, nc = replicate
    return (DECK_HEAD.format(ensemble=ensemble, data=data, na=na, nb=nb, nc=nc, thermo=thermo)
            + ENSEMBLES[ensemble] + DECK_TAIL.format(steps=steps))


@dataclass(frozen=True)
class LammpsRun:
    """Where a LAMMPS run wrote its log and dump, and how long it took."""

    folder: Path
    seconds: float
    log: Path
    dump: Path


def lammps_command(engine: str, deck: Path, model: Path, nprocs: int = 1, variables: dict | None = None) -> list[str]:
    """The command line running ``deck`` with deepmd-kit's pair style ('deepmd') or minidp's ('minidp');
    ``variables``: more index variables (name: value)."""
    values = {"pair": engine, "model": str(model), **(variables or {})}
    if engine == "deepmd":
        cmd = [shutil.which("lmp") or "lmp", "-in", str(deck)]
        flag = "-var"
    elif engine == "minidp":
        # --overwrite: a rerun in the same folder replaces its earlier log.lammps (minidp keeps any other file)
        cmd = [sys.executable, "-m", "minidp", "lammps", str(deck), "--overwrite"]
        flag = "-v"
    else:
        raise ValueError(f"engine must be 'deepmd' or 'minidp', got {engine!r}")
    for name, value in values.items():
        cmd += [flag, name, str(value)]
    cmd += ["-log", "log.lammps", "-screen", "none"]
    return (["mpirun", "-np", str(nprocs)] + cmd) if nprocs > 1 else cmd


def run_lammps(engine: str, deck_text: str, model: Path, folder: Path, nprocs: int = 1,
               timeout: float = 3600, variables: dict | None = None) -> LammpsRun:
    """Write the deck to folder/in.lammps and run it there; RuntimeError with the output's tail if it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    deck = folder / "in.lammps"
    deck.write_text(deck_text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run(lammps_command(engine, deck, Path(model).resolve(), nprocs, variables), cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not (folder / "final.dump").is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{engine} LAMMPS run in {folder} failed (exit {done.returncode}):\n{tail}")
    return LammpsRun(folder, seconds, folder / "log.lammps", folder / "final.dump")


def read_thermo(log: Path) -> dict[str, np.ndarray]:
    """The thermo table of the last run in a LAMMPS log: {column name: values per printed step}."""
    lines = log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] == ["Step"]]
    if not starts:
        raise ValueError(f"{log} has no thermo table")
    names = lines[starts[-1]].split()
    rows = []
    for line in lines[starts[-1] + 1:]:
        fields = line.split()
        if len(fields) != len(names) or not re.fullmatch(r"-?\d+", fields[0]):
            break
        rows.append([float(x) for x in fields])
    # (nprinted, ncolumns)
    table = np.array(rows)
    return {name: table[:, k] for k, name in enumerate(names)}


def read_dump(dump: Path) -> dict[str, np.ndarray]:
    """A write_dump custom file: box bounds (3, 2 or 3) and columns id type x y z vx vy vz (natoms, 8)."""
    lines = dump.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("ITEM: BOX BOUNDS"))
    box = np.array([[float(x) for x in lines[i + 1 + d].split()] for d in range(3)])
    j = next(k for k, line in enumerate(lines) if line.startswith("ITEM: ATOMS"))
    atoms = np.array([[float(x) for x in line.split()] for line in lines[j + 1:] if line.strip()])
    return {"box": box, "atoms": atoms}


def relative_difference(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| (the scale of the quantity, so that values near zero do not blow it up)."""
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(ours - ref))) / (scale if scale > 0 else 1.0)


def compare_lammps(ours: LammpsRun, ref: LammpsRun) -> dict[str, float]:
    """Relative differences: pe and press at every step, the six pressure components, then positions,
    velocities and the box after the last step."""
    a, b = read_thermo(ours.log), read_thermo(ref.log)
    if a["Step"].shape != b["Step"].shape or not np.array_equal(a["Step"], b["Step"]):
        raise ValueError(f"the runs printed different steps: {a['Step'][:3]}... and {b['Step'][:3]}...")
    out = {"pe": relative_difference(a["PotEng"], b["PotEng"]), "press": relative_difference(a["Press"], b["Press"])}
    comps = ("Pxx", "Pyy", "Pzz", "Pxy", "Pxz", "Pyz")
    out["pressure tensor"] = relative_difference(np.stack([a[c] for c in comps]), np.stack([b[c] for c in comps]))
    da, db = read_dump(ours.dump), read_dump(ref.dump)
    out["positions"] = relative_difference(da["atoms"][:, 2:5], db["atoms"][:, 2:5])
    out["velocities"] = relative_difference(da["atoms"][:, 5:8], db["atoms"][:, 5:8])
    out["box"] = relative_difference(da["box"], db["box"])
    return out


# ---------------------------------------------------------------------------
# i-PI
# ---------------------------------------------------------------------------

IPI_XML = """<simulation verbosity='low' safe_stride='100000' floatformat='%25.16e'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [ step, time{{picosecond}}, conserved{{electronvolt}},
      temperature{{kelvin}}, potential{{electronvolt}}, pressure_md{{bar}} ] </properties>
  </output>
  <total_steps> {steps} </total_steps>
  <prng><seed> 31415 </seed></prng>
  <ffsocket name='driver' mode='unix' pbc='false'>
    <address> {address} </address>
    <latency> 1e-4 </latency>
  </ffsocket>
  <system>
    <initialize nbeads='{nbeads}'>
      <file mode='xyz' units='angstrom'> init.xyz </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities>
    </initialize>
    <forces><force forcefield='driver'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'> 0.5 </timestep>
        <thermostat mode='{thermostat}'><tau units='femtosecond'> 100 </tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units='kelvin'> 300 </temperature></ensemble>
  </system>
</simulation>
"""


def write_ipi_xyz(system: Path, path: Path) -> Path:
    """The first frame of a deepmd/npy system as i-PI's init.xyz (orthorhombic cell in the comment line)."""
    names = (system / "type_map.raw").read_text().split()
    types = np.loadtxt(system / "type.raw", dtype=int)
    sets = sorted(system.glob("set.*"))
    x = np.load(sets[0] / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    cell = np.load(sets[0] / "box.npy")[0].reshape(3, 3).astype(np.float64)
    if np.count_nonzero(cell - np.diag(np.diag(cell))):
        raise ValueError(f"{system}: write_ipi_xyz handles orthorhombic cells only")
    a, b, c = np.diag(cell)
    lines = [str(len(types)), f"# CELL(abcABC): {a:.10f} {b:.10f} {c:.10f} 90.0 90.0 90.0 cell{{angstrom}} "
             "positions{angstrom}"]
    lines += [f"{names[t]} {p[0]:.10f} {p[1]:.10f} {p[2]:.10f}" for t, p in zip(types, x)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ipi_input(steps: int, nbeads: int, address: str) -> str:
    """i-PI's input: NVT at 300 K (Langevin for one bead, PILE-L for a path integral), 0.5 fs steps."""
    return IPI_XML.format(steps=steps, nbeads=nbeads, address=address,
                          thermostat="langevin" if nbeads == 1 else "pile_l")


@dataclass(frozen=True)
class IpiRun:
    folder: Path
    seconds: float
    properties: Path
    restart: Path


def client_command(engine: str, model: Path, address: str, folder: Path) -> list[str]:
    """dp_ipi (with its JSON input, written to folder) or minidp ipi, on the UNIX socket ``address``."""
    if engine == "deepmd":
        spec = {"verbose": False, "use_unix": True, "port": 31415, "host": address, "graph_file": str(model),
                "coord_file": "init.xyz", "atom_type": {"O": 0, "H": 1}}
        (folder / "dp_ipi.json").write_text(json.dumps(spec, indent=2))
        return [shutil.which("dp_ipi") or "dp_ipi", "dp_ipi.json"]
    if engine == "minidp":
        return [sys.executable, "-m", "minidp", "ipi", "-m", str(model), "--unix", address, "-c", "init.xyz"]
    raise ValueError(f"engine must be 'deepmd' or 'minidp', got {engine!r}")


def run_ipi(engine: str, system: Path, model: Path, folder: Path, steps: int, nbeads: int = 1,
            timeout: float = 1800) -> IpiRun:
    """i-PI's server and one force client in ``folder``; waits for both, returns where i-PI wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    write_ipi_xyz(system, folder / "init.xyz")
    address = f"minidp-{uuid.uuid4().hex[:10]}"
    (folder / "input.xml").write_text(ipi_input(steps, nbeads, address))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(folder / "server.out", "w") as s_out, open(folder / "client.out", "w") as c_out:
        server = subprocess.Popen([shutil.which("i-pi") or "i-pi", "input.xml"], cwd=folder, stdout=s_out,
                                  stderr=subprocess.STDOUT, env=env)
        _wait_for_socket(Path(f"/tmp/ipi_{address}"), server)
        client = subprocess.Popen(client_command(engine, Path(model).resolve(), address, folder), cwd=folder,
                                  stdout=c_out, stderr=subprocess.STDOUT, env=env)
        try:
            server.wait(timeout=timeout)
            client.wait(timeout=60)
        finally:
            for proc in (client, server):
                if proc.poll() is None:
                    proc.kill()
    seconds = time.perf_counter() - t0
    if server.returncode != 0 or not (folder / "RESTART").is_file():
        tail = "\n".join((folder / "server.out").read_text().splitlines()[-15:])
        raise RuntimeError(f"i-PI with {engine} in {folder} failed (exit {server.returncode}):\n{tail}")
    return IpiRun(folder, seconds, folder / "sim.out", folder / "RESTART")


def _wait_for_socket(path: Path, server: subprocess.Popen, patience: float = 120) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if server.poll() is not None or time.perf_counter() - t0 > patience:
            raise RuntimeError(f"the i-PI server did not open {path} (exit {server.poll()})")
        time.sleep(0.1)


def read_restart_beads(restart: Path) -> dict[str, np.ndarray]:
    """Positions q and momenta p of all beads (atomic units) from i-PI's RESTART file."""
    text = restart.read_text()
    out = {}
    for name in ("q", "p"):
        m = re.search(rf"<{name} shape='\(([^)]*)\)'>\s*\[(.*?)\]\s*</{name}>", text, re.S)
        if m is None:
            raise ValueError(f"{restart} has no <{name}> array")
        out[name] = np.array([float(x) for x in m.group(2).replace(",", " ").split()])
    return out


def read_ipi_properties(path: Path) -> np.ndarray:
    """i-PI's properties file as (nsteps + 1, ncolumns)."""
    return np.loadtxt(path, comments="#", ndmin=2)


def compare_ipi(ours: IpiRun, ref: IpiRun) -> dict[str, float]:
    """Relative differences: conserved energy, temperature, potential, pressure every step; q and p at the end."""
    a, b = read_ipi_properties(ours.properties), read_ipi_properties(ref.properties)
    names = ("conserved", "temperature", "potential", "pressure")
    out = {name: relative_difference(a[:, k + 2], b[:, k + 2]) for k, name in enumerate(names)}
    qa, qb = read_restart_beads(ours.restart), read_restart_beads(ref.restart)
    out["positions"] = relative_difference(qa["q"], qb["q"])
    out["momenta"] = relative_difference(qa["p"], qb["p"])
    return out
