"""validation/train_compare: its arguments, the input each run reads, the refusal of an input minidp cannot
train, and the summary tables from a small fixture (no training, no deepmd-kit)."""

from __future__ import annotations

import json

import pytest

from validation.train_compare import collect, main, make_input, parse_args, spread, summarize

INPUT = {"model": {"type_map": ["O", "H"],
                   "descriptor": {"type": "se_e2_a", "sel": [4, 8], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                                  "axis_neuron": 2, "precision": "float64", "seed": 1},
                   "fitting_net": {"neuron": [8], "precision": "float64", "seed": 1}},
         "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
         "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1},
         "training": {"training_data": {"systems": ["../data/a", "../data/b"], "batch_size": 1},
                      "validation_data": {"systems": "../data/c", "batch_size": 1},
                      "stop_batch": 100, "seed": 10, "disp_freq": 5, "save_freq": 50}}


def write_input(tmp_path, d=INPUT):
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "input.json"
    path.write_text(json.dumps(d))
    return path


def test_arguments_default_to_the_shared_input_and_one_dp_seed():
    args = parse_args(["--seeds", "1", "2", "3", "--precision", "float32"])
    assert args.input.name == "input.json" and args.input.parent.name == "models"
    assert args.seeds == [1, 2, 3] and args.dp_seeds == [1] and args.precision == "float32"
    assert parse_args([]).seeds == [None] and parse_args([]).dp_seeds == [None]
    assert parse_args(["--seeds", "4", "--dp-seeds"]).dp_seeds == []
    with pytest.raises(SystemExit):
        parse_args(["--precision", "float16"])


def test_make_input_sets_seeds_precision_length_and_absolute_systems(tmp_path):
    path = write_input(tmp_path)
    d = make_input(path, 30, 10, seed=3, precision="float32")
    model, tr = d["model"], d["training"]
    assert model["descriptor"]["seed"] == model["fitting_net"]["seed"] == 3 and tr["seed"] == 4
    assert model["descriptor"]["precision"] == model["fitting_net"]["precision"] == "float32"
    assert tr["training_data"]["systems"] == [str(tmp_path / "data" / "a"), str(tmp_path / "data" / "b")]
    assert tr["validation_data"]["systems"] == str(tmp_path / "data" / "c")
    assert (tr["numb_steps"], tr["disp_freq"], tr["save_freq"]) == (30, 10, 30) and "stop_batch" not in tr
    kept = make_input(path, 30, 10)
    assert kept["model"]["descriptor"]["seed"] == 1 and kept["training"]["seed"] == 10
    assert kept["model"]["fitting_net"]["precision"] == "float64"


def test_an_input_minidp_cannot_train_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):  # main sets them: restored after the test
        monkeypatch.setenv(name, "1")
    # minidp fits energy models only: a tensor loss is refused whatever the data
    path = write_input(tmp_path, {**INPUT, "loss": {"type": "tensor"}})
    assert main(["--input", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_compare: minidp cannot train {path}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def fixture_summary(precision: str) -> dict:
    runs = {"deepmd-kit": {"1": {"rmse_e_per_atom": 1e-3, "rmse_f": 0.1, "seconds_per_step": 0.3}},
            "minidp": {s: {"rmse_e_per_atom": e, "rmse_f": f, "seconds_per_step": 0.2}
                       for s, e, f in (("1", 1e-3, 0.1), ("2", 2e-3, 0.12), ("3", 3e-3, 0.11))}}
    return {"input": "/x/models/input.json", "steps": 2000, "precision": precision, "evaluated_on": ["/x/data_3"],
            "runs": runs, "stats": {p: spread(r) for p, r in runs.items()},
            "machine": {"cpu": "CPU", "cores": 2, "load_average": [1.0, 1.0, 1.0], "threads": "OMP_NUM_THREADS=1",
                        "date": "2026-12-06 08:00 UTC"}}


def test_spread_is_mean_min_max_over_seeds():
    s = fixture_summary("float64")["stats"]["minidp"]
    assert s["rmse_e_per_atom"] == pytest.approx({"mean": 2e-3, "min": 1e-3, "max": 3e-3})
    assert s["rmse_f"] == pytest.approx({"mean": 0.11, "min": 0.1, "max": 0.12})


def test_summary_and_collected_table_show_mean_and_spread_in_meV():
    md = summarize(fixture_summary("float32"))
    assert "| minidp | 1, 2, 3 | 2 [1-3] | 110 [100-120] |" in md
    assert "| deepmd-kit | 1 | 1 | 100 |" in md
    assert "not a benchmark" in md and "| minidp | 2 | 2 | 120 | 0.2 |" in md
    table = collect([fixture_summary("float64"), fixture_summary("float32")])
    assert "| models/input.json, float32, 2000 steps | minidp | 1, 2, 3 | 2 [1-3] | 110 [100-120] |" in table
    assert table.count("| deepmd-kit |") == 2 and "CPU, 2 cores" in table
