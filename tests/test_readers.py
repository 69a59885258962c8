"""What users hand eval, test, eval-desc and model-devi (issue 20): every system a -s names is read, and read
right, or refused in one line naming the file and frame.

deepmd/npy/mixed systems (per-frame types), HDF5 files of several systems, extended XYZ checked against the
file, empty systems, non-finite labels. Fixtures are built in tmp_path from ../shared's water data.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from minidp import DeepPot
from minidp.cli import main
from minidp.io.systems import model_types, read_system
from minidp.io.systems import lazy_system, open_systems, read_frames
from tests.conftest import WATER, need
from tests.test_cli import small_model, small_system  # noqa: F401  (fixtures)

dpdata = pytest.importorskip("dpdata")


def _one_line(capsys, *texts):
    """stderr is one line holding every text (and no traceback); returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(t in err[0] for t in texts), err
    return err[0]


@pytest.fixture(scope="module")
def water():
    """3 labelled frames of data_0 (64 O + 128 H)."""
    return dpdata.LabeledSystem(str(need(WATER / "data_0")), fmt="deepmd/npy")[:3]


@pytest.fixture(scope="module")
def retyped(water):
    """The same frames with atom 64 (an H) made an O: the same atom count, other types (O65H127)."""
    s = water.copy()
    s.data["atom_types"] = s.data["atom_types"].copy()
    s.data["atom_types"][64] = 0
    s.data["atom_numbs"] = [65, 127]
    return s


@pytest.fixture(scope="module")
def dp(small_model):  # noqa: F811
    return DeepPot(small_model, progress=False)


def _energies(dp, system) -> np.ndarray:
    """DeepPot's energies of a dpdata system, its types mapped by name."""
    types = model_types(system["atom_names"], system["atom_types"], dp.get_type_map())
    return dp.eval(system["coords"], None if system.nopbc else system["cells"], types)[0][:, 0]


# ---------------------------------------------------------------------------
# 1. deepmd/npy/mixed: each frame with its own types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [None, 192])
def test_mixed_systems_are_read_with_each_frames_types(dp, small_model, water, retyped, tmp_path, pad,  # noqa: F811
                                                       capsys):
    """eval and test on a mixed folder equal the separate systems (with padding atoms when pad is given);
    before, every atom was typed as type.raw's placeholder (the first type)."""
    half = water.pick_atom_idx(list(range(96)))  # 64 O + 32 H: padded to 192 atoms with pad=192
    other = half if pad else retyped
    dpdata.MultiSystems(water, other).to("deepmd/npy/mixed", str(tmp_path / "mixed"),
                                         **({"atom_numb_pad": pad} if pad else {}))
    mixed = tmp_path / "mixed" / "192"
    assert (mixed / "set.000" / "real_atom_types.npy").is_file()
    out = tmp_path / "out"
    assert main(["eval", "-m", str(small_model), "-s", str(mixed), "-o", str(out)]) == 0
    real = np.load(mixed / "set.000" / "real_atom_types.npy")
    energy = np.load(out / "set.000" / "energy.npy").ravel()
    # each kind of frame, in order of first appearance (water first), evaluated with its own types
    np.testing.assert_allclose(np.sort(energy), np.sort(np.concatenate([_energies(dp, water), _energies(dp, other)])),
                               rtol=1e-10)
    first = (real == real[0]).all(axis=1)
    np.testing.assert_allclose(energy[first], _energies(dp, water), rtol=1e-10)
    np.testing.assert_array_equal(np.load(out / "set.000" / "real_atom_types.npy"), real)  # the layout kept
    # test: the errors of all frames together equal those of the two systems as one deepmd/npy each
    capsys.readouterr()
    assert main(["test", "-m", str(small_model), "-s", str(mixed)]) == 0
    ours = capsys.readouterr().out
    (tmp_path / "apart").mkdir()
    dpdata.MultiSystems(water, other).to("deepmd/hdf5", str(tmp_path / "apart" / "both.h5"))
    assert main(["test", "-m", str(small_model), "-s", str(tmp_path / "apart" / "both.h5")]) == 0
    assert capsys.readouterr().out == ours


def test_mixed_is_refused_by_one_type_per_atom_readers(water, retyped, tmp_path):
    """Readers that take one type per atom (training, change-bias, neighbor-stat) refuse a mixed system
    instead of typing every atom by type.raw's placeholders."""
    dpdata.MultiSystems(water, retyped).to("deepmd/npy/mixed", str(tmp_path / "m"))
    mixed = tmp_path / "m" / "192"
    with pytest.raises(ValueError, match=r"is deepmd/npy/mixed \(per-frame types"):
        read_system(mixed)
    with pytest.raises(ValueError, match=r"is deepmd/npy/mixed \(per-frame types"):
        lazy_system(mixed)
    assert lazy_system(mixed, per_frame_types=True).mixed
    np.save(mixed / "set.000" / "real_atom_types.npy", np.full((6, 192), 7))
    system = open_systems(mixed)[0]  # the types are checked when read
    with pytest.raises(ValueError, match=r"set.000/real_atom_types.npy: frame 0 \(frame 0 of the system\) holds 7; "
                                         r"expected types in 0..1"):
        read_frames(system, 0, 1)


def test_mixed_types_out_of_range_are_named(small_model, water, retyped, tmp_path, capsys):  # noqa: F811
    dpdata.MultiSystems(water, retyped).to("deepmd/npy/mixed", str(tmp_path / "m"))
    mixed = tmp_path / "m" / "192"
    real = np.load(mixed / "set.000" / "real_atom_types.npy")
    real[4, 10] = 7
    np.save(mixed / "set.000" / "real_atom_types.npy", real)
    assert main(["eval", "-m", str(small_model), "-s", str(mixed), "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, "set.000/real_atom_types.npy: frame 4", "holds 7")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# 2. extended XYZ: dpdata's reading checked against the file
# ---------------------------------------------------------------------------


def _xyz(water, path, edit=None):
    water.to("extxyz", str(path))
    if edit:
        path.write_text(edit(path.read_text()))
    return path


def test_extxyz_every_frame_is_read(dp, small_model, water, tmp_path, capsys):  # noqa: F811
    """A 3-frame extxyz is 3 frames (dpdata's LabeledSystem reads the first only)."""
    xyz = _xyz(water, tmp_path / "w.xyz")
    assert main(["eval", "-m", str(small_model), "-s", str(xyz), "-o", str(tmp_path / "o")]) == 0
    assert "3 frames of 192 atoms" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "o" / "set.000" / "energy.npy").ravel(), _energies(dp, water),
                               rtol=1e-10)


def test_extxyz_of_two_kinds_of_frame_writes_one_system_each(dp, small_model, water, tmp_path, capsys):  # noqa: F811
    half = water.pick_atom_idx(list(range(96)))[:2]
    # dpdata ends a file without a newline
    parts = [_xyz(water[:1], tmp_path / "a.xyz"), _xyz(half, tmp_path / "b.xyz"), _xyz(water[1:], tmp_path / "c.xyz")]
    (tmp_path / "both.xyz").write_text("\n".join(p.read_text().rstrip("\n") for p in parts) + "\n")
    out = tmp_path / "o"
    assert main(["eval", "-m", str(small_model), "-s", str(tmp_path / "both.xyz"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["O64H128", "O64H32"]
    np.testing.assert_allclose(np.load(out / "O64H128" / "set.000" / "energy.npy").ravel(), _energies(dp, water),
                               rtol=1e-10)
    np.testing.assert_allclose(np.load(out / "O64H32" / "set.000" / "energy.npy").ravel(), _energies(dp, half),
                               rtol=1e-10)
    with pytest.raises(ValueError, match=r"holds frames of 2 kinds of atoms \(O64H128 from frame 0, O64H32 from "
                                         r"frame 1\)"):
        read_system(tmp_path / "both.xyz")


def _nan_in_frame_1(text: str) -> str:
    lines = text.splitlines()
    atom = lines[194 + 2 + 5].split()
    atom[2] = "nan"
    lines[194 + 2 + 5] = " ".join(atom)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("edit, texts", [
    (_nan_in_frame_1, ["w.xyz: frame 1 has a non-finite coordinate (nan)"]),
    (lambda t: t.replace('pbc="T T T"', 'pbc="T F T"'), ["w.xyz frame 0 has pbc=\"T F T\"", "fully periodic"]),
    (lambda t: t.replace('pbc="T T T"', "pbc=T", 1), ["w.xyz frame 0 has pbc=\"T\""]),
    (lambda t: t[:len(t) // 2], ["w.xyz", "frame 1"]),  # cut in the middle of a line of frame 1
    (lambda t: "\n".join(t.splitlines()[:300]) + "\n", ["w.xyz ends inside frame 1: 104 of its 192 atom lines"]),
    (lambda t: t.replace("energy=", "energy=nan #", 1).replace("#", " ", 1),
     ["w.xyz: frame 0 has a non-finite energy"]),
    (lambda t: "abc" + t[3:], ["w.xyz line 1: expected the atom count of frame 0, got 'abc'"]),
])
def test_extxyz_problems_are_named(small_model, water, tmp_path, capsys, edit, texts):  # noqa: F811
    xyz = _xyz(water, tmp_path / "w.xyz", edit)
    before = xyz.read_bytes()
    for argv in (["eval", "-o", str(tmp_path / "o")], ["test"], ["model-devi", "-o", str(tmp_path / "md")]):
        models = ["-m", str(small_model)] + ([str(small_model)] if argv[0] == "model-devi" else [])
        assert main([argv[0], *models, "-s", str(xyz), *argv[1:]]) == 2
        _one_line(capsys, *texts)
    assert xyz.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.xyz"]


def test_extxyz_frames_dpdata_drops_are_refused(small_model, water, tmp_path, capsys, monkeypatch):  # noqa: F811
    """dpdata skips what it cannot parse: its frame count is checked against the file's."""
    from dpdata.plugins.xyz import QuipGapXYZFormat

    real = QuipGapXYZFormat.from_multi_systems
    monkeypatch.setattr(QuipGapXYZFormat, "from_multi_systems", lambda self, f, **k: list(real(self, f, **k))[::2])
    xyz = _xyz(water, tmp_path / "w.xyz")
    assert main(["eval", "-m", str(small_model), "-s", str(xyz), "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"dpdata read 2 frames of {xyz}, which holds 3")


def test_open_extxyz_is_evaluated_open(dp, small_model, water, tmp_path):  # noqa: F811
    xyz = _xyz(water, tmp_path / "w.xyz", lambda t: t.replace('pbc="T T T"', 'pbc="F F F"'))
    assert main(["eval", "-m", str(small_model), "-s", str(xyz), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "nopbc").exists()
    types = model_types(water["atom_names"], water["atom_types"], dp.get_type_map())
    np.testing.assert_allclose(np.load(tmp_path / "o" / "set.000" / "energy.npy").ravel(),
                               dp.eval(water["coords"], None, types)[0][:, 0], rtol=1e-10)


# ---------------------------------------------------------------------------
# 3. HDF5 files of several systems, and file.h5#group, read as deepmd-kit reads them
# ---------------------------------------------------------------------------


@pytest.fixture
def multi_h5(water, tmp_path):
    half = water.pick_atom_idx(list(range(96)))[:2]
    dpdata.MultiSystems(water, half).to("deepmd/hdf5", str(tmp_path / "multi.h5"))
    return tmp_path / "multi.h5", half


def test_hdf5_of_several_systems_in_every_command(dp, small_model, water, multi_h5, tmp_path, capsys):  # noqa: F811
    h5, half = multi_h5
    out = tmp_path / "o"
    assert main(["eval", "-m", str(small_model), "-s", str(h5), "-o", str(out)]) == 0
    np.testing.assert_allclose(np.load(out / "O64H32" / "set.000" / "energy.npy").ravel(), _energies(dp, half),
                               rtol=1e-10)
    np.testing.assert_allclose(np.load(out / "O64H128" / "set.000" / "energy.npy").ravel(), _energies(dp, water),
                               rtol=1e-10)
    # a previous output of several systems is replaced with --overwrite, and only if it holds nothing else
    assert main(["eval", "-m", str(small_model), "-s", str(h5), "-o", str(out), "--overwrite"]) == 0
    (out / "O64H32" / "notes.txt").write_text("mine")
    assert main(["eval", "-m", str(small_model), "-s", str(h5), "-o", str(out), "--overwrite"]) == 2
    _one_line(capsys, "holds more than a previous minidp deepmd/npy output")
    # a group, as dpdata and deepmd-kit name it
    assert main(["eval", "-m", str(small_model), "-s", f"{h5}#O64H32", "-o", str(tmp_path / "g")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "g" / "set.000" / "energy.npy").ravel(), _energies(dp, half),
                               rtol=1e-10)
    assert main(["eval-desc", "-m", str(small_model), "-s", str(h5), "-o", str(tmp_path / "d")]) == 0
    assert np.load(tmp_path / "d" / "multi.h5_O64H32.npy").shape == (2, 96, dp.get_dim_descriptor())
    assert main(["model-devi", "-m", str(small_model), str(small_model), "-s", str(h5), "-o",
                 str(tmp_path / "md.out")]) == 0
    headers = [line for line in (tmp_path / "md.out").read_text().splitlines() if not line.startswith("# step")
               and line.startswith("#")]
    assert headers == [f"# {h5}#/O64H128", f"# {h5}#/O64H32"]
    capsys.readouterr()
    assert main(["test", "-m", str(small_model), "-s", str(h5), "-n", "2"]) == 0
    table = capsys.readouterr().out
    # frames of 192 and 96 atoms: the energy per atom is over E_f / natoms_f, dp test's weighted average
    e = np.concatenate([_energies(dp, water[:2]) - water["energies"][:2], _energies(dp, half) - half["energies"]])
    per_atom = e / np.repeat([192, 96], 2)
    assert f"energy/atom        RMSE {np.sqrt(np.mean(per_atom ** 2)):.6e}" in table


def test_one_system_readers_name_the_groups(multi_h5):
    with pytest.raises(ValueError, match=r"multi.h5 holds no system at its root \(groups \['O64H128', 'O64H32'\]\); "
                                         r"name one as .*multi.h5#GROUP"):
        read_system(multi_h5[0])
    assert read_system(f"{multi_h5[0]}#O64H32").get_natoms() == 96


# ---------------------------------------------------------------------------
# 4. model-devi: an empty system, and the options' ranges
# ---------------------------------------------------------------------------


def _empty_system(folder):
    (folder / "set.000").mkdir(parents=True)
    (folder / "type.raw").write_text("0\n1\n1\n")
    (folder / "type_map.raw").write_text("O\nH\n")
    np.save(folder / "set.000" / "coord.npy", np.zeros((0, 9)))
    np.save(folder / "set.000" / "box.npy", np.zeros((0, 9)))
    return folder


def test_model_devi_refuses_an_empty_system_before_any_work(small_model, small_system, tmp_path, capsys):  # noqa: F811
    empty = _empty_system(tmp_path / "empty")
    out = tmp_path / "md.out"
    for systems in ([empty], [small_system, empty], [empty, small_system]):
        assert main(["model-devi", "-m", str(small_model), str(small_model), "-s", *map(str, systems),
                     "-o", str(out)]) == 2
        _one_line(capsys, f"system {empty} has no frames")
        assert not out.exists()
    for command in (["eval", "-o", str(tmp_path / "o")], ["test"], ["eval-desc", "-o", str(tmp_path / "d")]):
        assert main([command[0], "-m", str(small_model), "-s", str(empty), *command[1:]]) == 2
        _one_line(capsys, f"system {empty} has no frames")


@pytest.mark.parametrize("option, text", [
    (["--relative", "nan"], "--relative: nan is not finite"),
    (["--relative", "-1"], "--relative: -1.0 is below 0.0"),
    (["--relative_v", "inf"], "--relative_v: inf is not finite"),
    (["-f", "0"], "--frequency must be a positive integer, got 0"),
    (["-f", "-10"], "--frequency must be a positive integer, got -10"),
])
def test_model_devi_options_are_checked(small_model, small_system, tmp_path, capsys, option, text):  # noqa: F811
    assert main(["model-devi", "-m", str(small_model), str(small_model), "-s", str(small_system), *option,
                 "-o", str(tmp_path / "md.out")]) == 2
    _one_line(capsys, text)
    assert not (tmp_path / "md.out").exists()


def test_deviation_functions_check_their_arguments():
    from minidp.active.model_devi import energy_deviation, force_deviation, virial_deviation

    with pytest.raises(ValueError, match="relative: nan is not finite"):
        force_deviation(np.ones((2, 1, 3, 3)), relative=float("nan"))
    with pytest.raises(ValueError, match="relative_v: -1.0 is below 0.0"):
        virial_deviation(np.ones((2, 1, 9)), 3, relative_v=-1.0)
    with pytest.raises(ValueError, match="natoms must be a positive integer, got 0"):
        virial_deviation(np.ones((2, 1, 9)), 0)
    with pytest.raises(ValueError, match="natoms must be a positive integer, got 0"):
        energy_deviation(np.ones((2, 1)), 0)


# ---------------------------------------------------------------------------
# 5. messages that name the file
# ---------------------------------------------------------------------------


def test_binary_and_truncated_files_are_named(small_model, tmp_path, capsys):  # noqa: F811
    binary = tmp_path / "b.xyz"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["eval", "-m", str(small_model), "-s", str(binary), "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"cannot read system {binary}", "not a text file")
    ase = pytest.importorskip("ase")
    ase_outcar = need(Path(ase.__file__).parent / "test" / "testdata" / "vasp" / "OUTCAR_example_1")
    outcar = tmp_path / "OUTCAR"
    outcar.write_text("".join(ase_outcar.read_text().splitlines(keepends=True)[:2000]))  # cut before its forces
    assert main(["test", "-m", str(small_model), "-s", str(outcar), "-f", "vasp/outcar"]) == 2
    _one_line(capsys, f"system {outcar} read as 'vasp/outcar' holds 0 frames", "is the file complete?")


def test_left_handed_poscar_is_named(small_model, water, tmp_path, capsys):  # noqa: F811
    water[:1].to("vasp/poscar", str(tmp_path / "POSCAR"))
    lines = (tmp_path / "POSCAR").read_text().splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    (tmp_path / "POSCAR").write_text("\n".join(lines) + "\n")
    assert main(["eval", "-m", str(small_model), "-s", str(tmp_path / "POSCAR"), "-f", "vasp/poscar",
                 "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"cannot read system {tmp_path / 'POSCAR'} as 'vasp/poscar': its cell is left-handed")


def test_empty_type_raw_is_named_without_a_numpy_warning(small_model, small_system, tmp_path, capsys):  # noqa: F811
    s = tmp_path / "s"
    shutil.copytree(small_system, s)
    (s / "type.raw").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["eval", "-m", str(small_model), "-s", str(s), "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"type.raw of {s} is empty")
    (s / "type.raw").write_bytes(b"\xff\xfe\x00")
    assert main(["eval", "-m", str(small_model), "-s", str(s), "-o", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"{s / 'type.raw'} must list one integer type per atom")


# ---------------------------------------------------------------------------
# 6. labels: finite, or the file and frame named
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, frame, value", [("energy", 2, np.nan), ("force", 4, np.inf), ("virial", 3, np.nan)])
def test_non_finite_labels_are_named(small_model, tmp_path, capsys, water, key, frame, value):  # noqa: F811
    s = water.copy()
    s.data["virials"] = np.zeros((3, 3, 3))
    s = s + s  # 6 frames in two sets of 3: frame 4 is frame 1 of set.001
    name = {"energy": "energies", "force": "forces", "virial": "virials"}[key]
    s.data[name] = s.data[name].copy()
    s.data[name].reshape(6, -1)[frame, 0 if key == "energy" else 1] = value
    s.to("deepmd/npy", str(tmp_path / "s"), set_size=3)
    where = f"set.{frame // 3:03d}/{key}.npy: frame {frame % 3} (frame {frame} of the system) holds {value}"
    assert main(["test", "-m", str(small_model), "-s", str(tmp_path / "s")]) == 2
    _one_line(capsys, where)
    # the labels are not read by eval: a damaged label does not stop it
    assert main(["eval", "-m", str(small_model), "-s", str(tmp_path / "s"), "-o", str(tmp_path / "o")]) == 0
    # the reader training shares (minidp.io.systems.read_system) names the frame too
    with pytest.raises(ValueError, match=rf"frame {frame} has a non-finite {key} \({value}\)"):
        read_system(tmp_path / "s")
    s.to("deepmd/hdf5", str(tmp_path / "s.h5"), set_size=3)
    assert main(["test", "-m", str(small_model), "-s", str(tmp_path / "s.h5")]) == 2
    _one_line(capsys, f"s.h5#/set.{frame // 3:03d}/{key}.npy: frame {frame % 3}")
