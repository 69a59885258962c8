"""The ASE calculator and the two examples that use it, and the OpenMM example, run briefly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import MODEL_DP, ROOT, WATER, need


@pytest.fixture
def ase():
    return pytest.importorskip("ase")


def test_calculator_matches_deeppot_and_stress_is_minus_virial_over_volume(ase, water_frames):
    from ase import Atoms

    from minidp import DeepPot
    from minidp.md.calculator import MiniDPCalculator

    coords, cells, types = water_frames
    atoms = Atoms([["O", "H"][t] for t in types], positions=coords[0].reshape(-1, 3),
                  cell=cells[0].reshape(3, 3), pbc=True)
    atoms.calc = MiniDPCalculator(str(need(MODEL_DP)))
    e, f, v = DeepPot(MODEL_DP).eval(coords[:1], cells[:1], types)
    assert atoms.get_potential_energy() == pytest.approx(e[0, 0], rel=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), f[0], atol=1e-12)
    stress = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(stress, -v[0].reshape(3, 3) / atoms.get_volume(), atol=1e-12)


def test_calculator_refuses_unknown_elements(ase):
    from ase import Atoms

    from minidp.md.calculator import MiniDPCalculator

    atoms = Atoms("CO", positions=[[0, 0, 0], [1.2, 0, 0]])
    atoms.calc = MiniDPCalculator(str(need(MODEL_DP)))
    with pytest.raises(ValueError, match=r"element\(s\) \['C'\] are not in the model's type map \['O', 'H'\]"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("script, args, expect", [
    ("relax_cluster.py", ["--molecules", "3", "--max-steps", "300"], "BFGS"),
    ("nve_water.py", ["--steps", "10"], "drift"),
])
def test_examples_run(ase, script, args, expect, tmp_path):
    model, frames = need(MODEL_DP), need(WATER / "data_0")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", str(model),
                        "--frames", str(frames), "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_openmm_example_runs(tmp_path):
    pytest.importorskip("openmm")
    model, frames = need(MODEL_DP), need(WATER / "data_0")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "openmm_water.py"), "--model", str(model),
                        "--frames", str(frames), "--steps", "20", "--every", "10"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean temperature over the second half" in r.stdout
    assert list(tmp_path.iterdir()) == []
