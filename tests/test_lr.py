"""deepmd-kit's learning-rate schedules (exp, cosine, wsd, each with its warm-up): equal to deepmd-kit's own
at every step of a run, from the learning_rate section as deepmd-kit reads it; bad settings refused by name.

The reference is deepmd-kit's backend-neutral dpmodel schedule in float64 (its TF backend rounds the rate
to float32, its PyTorch backend takes dpmodel's value).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidp.optim import (DEFAULT_STOP_LR, LR_SCHEDULES, WSD_DECAY_TYPES, CosineLR, ExpLR, WsdLR, exp_decay,
                          lr_schedule, wsd_decay)

fast = settings(deadline=None, max_examples=40)


@pytest.fixture(scope="module")
def dp_lr():
    """deepmd-kit's dpmodel learning-rate module (the tests using it skip without deepmd-kit)."""
    pytest.importorskip("deepmd")
    return pytest.importorskip("deepmd.dpmodel.utils.learning_rate")


def assert_equals_deepmd_kit(dp_lr, section: dict, num_steps: int, extra: int = 300) -> None:
    """minidp's schedule at every step 0 .. num_steps + extra against deepmd-kit's, to 1e-12 relative."""
    ours = lr_schedule(section, num_steps)
    ref = dp_lr.BaseLR(**{"type": "exp", **section, "num_steps": num_steps})
    steps = np.arange(num_steps + extra)
    got = np.array([ours.lr(int(t)) for t in steps])
    want = np.asarray(ref.value(steps), dtype=np.float64)
    bad = np.abs(got - want) > 1e-12 * np.abs(want)
    assert not bad.any(), f"{section}, {num_steps} steps: steps {steps[bad][:5]}: {got[bad][:5]} vs {want[bad][:5]}"


# ---------------------------------------------------------------------------
# Drawn settings
# ---------------------------------------------------------------------------


@st.composite
def common(draw) -> tuple[dict, int]:
    """(the keys every type shares, num_steps): stop_lr or stop_lr_ratio, warm-up by steps or by ratio."""
    num_steps = draw(st.integers(1, 2000))
    start_lr = draw(st.floats(1e-5, 1e-1))
    section = {"start_lr": start_lr}
    if draw(st.booleans()):
        section["stop_lr"] = draw(st.sampled_from([0.0, 1e-10]) | st.floats(1e-9, 1e-1))
    else:
        section["stop_lr_ratio"] = draw(st.floats(1e-8, 1.0))
    warm = draw(st.sampled_from(["none", "steps", "ratio"]))
    if warm == "steps":
        section["warmup_steps"] = draw(st.integers(0, num_steps - 1))
    elif warm == "ratio":
        section["warmup_ratio"] = draw(st.floats(0.0, 0.99))
        if int(section["warmup_ratio"] * num_steps) >= num_steps:
            section["warmup_ratio"] = 0.5
    if warm != "none" and draw(st.booleans()):
        section["warmup_start_factor"] = draw(st.floats(0.0, 1.0))
    return section, num_steps


@st.composite
def exp_sections(draw) -> tuple[dict, int]:
    section, num_steps = draw(common())
    section["decay_steps"] = draw(st.integers(1, 3000))
    if draw(st.booleans()):
        section["decay_rate"] = draw(st.floats(0.5, 1.0))
    section["smooth"] = draw(st.booleans())
    if draw(st.booleans()):
        section["type"] = "exp"
    return section, num_steps


@st.composite
def wsd_sections(draw) -> tuple[dict, int]:
    section, num_steps = draw(common())
    # wsd needs a positive stop_lr
    if section.get("stop_lr", 1.0) == 0.0:
        section["stop_lr"] = 1e-9
    section.update(type="wsd", decay_phase_ratio=draw(st.floats(1e-3, 1.0)),
                   decay_type=draw(st.sampled_from(WSD_DECAY_TYPES)))
    return section, num_steps


def test_a_growing_exp_schedule_past_its_run_is_inf_as_deepmd_kits(dp_lr):
    """stop_lr > start_lr (deepmd-kit allows it): r > 1, and r^t overflowed (OverflowError) past the run."""
    assert_equals_deepmd_kit(dp_lr, {"start_lr": 0.00390625, "stop_lr": 0.0625, "decay_steps": 1}, 1)


@fast
@given(case=exp_sections())
def test_exp_equals_deepmd_kit_at_every_step(dp_lr, case):
    assert_equals_deepmd_kit(dp_lr, *case)


@fast
@given(case=common())
def test_cosine_equals_deepmd_kit_at_every_step(dp_lr, case):
    section, num_steps = case
    assert_equals_deepmd_kit(dp_lr, {**section, "type": "cosine"}, num_steps)


@fast
@given(case=wsd_sections())
def test_wsd_equals_deepmd_kit_at_every_step(dp_lr, case):
    assert_equals_deepmd_kit(dp_lr, *case)


@pytest.mark.parametrize("section, num_steps", [
    # the water example: 14000 steps, three decays (plus a run past the end)
    ({"type": "exp", "start_lr": 1e-3, "stop_lr": 3.51e-8, "decay_steps": 5000}, 14000),
    # decay_steps beyond the run: deepmd-kit's replacement (100, or T // 100 + 1)
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 5000}, 2000),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 5000}, 900),
    # ... but not with a given decay_rate; the floor at stop_lr holds then too
    ({"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 20, "decay_rate": 0.8}, 2000),
    ({"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 5000, "decay_rate": 0.5, "warmup_steps": 10}, 2000),
    ({"start_lr": 2e-3, "stop_lr_ratio": 1e-4, "decay_steps": 100, "smooth": True, "warmup_ratio": 0.1,
      "warmup_start_factor": 0.05}, 2000),
    ({"start_lr": 1e-3, "stop_lr": 0.0, "decay_steps": 10}, 2000),
    ({"type": "cosine", "start_lr": 1e-3, "stop_lr": 0.0}, 2000),
    ({"type": "cosine", "start_lr": 1e-3, "stop_lr_ratio": 1e-3, "warmup_steps": 200, "warmup_start_factor": 0.1},
     2000),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-6}, 2000),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-6, "decay_type": "cosine", "decay_phase_ratio": 1.0,
      "warmup_steps": 100}, 2000),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-6, "decay_type": "linear", "warmup_ratio": 0.2}, 2000),
    # a run of no steps: no decay phase (T = 0)
    ({"start_lr": 1e-3, "stop_lr": 1e-6}, 0),
    ({"type": "cosine", "start_lr": 1e-3, "stop_lr": 1e-6}, 0),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-6}, 0),
])
def test_chosen_runs_equal_deepmd_kit(dp_lr, section, num_steps):
    assert_equals_deepmd_kit(dp_lr, section, num_steps)


def test_a_section_without_stop_lr_stops_at_deepmd_kits_old_default(dp_lr):
    schedule = lr_schedule({"start_lr": 1e-3}, 1000)
    assert schedule == ExpLR(start_lr=1e-3, num_steps=1000, stop_lr=DEFAULT_STOP_LR)
    # deepmd-kit's input check fills it in before the schedule is built
    normalize = pytest.importorskip("deepmd.utils.argcheck").normalize
    keys = {"model": {"descriptor": {"type": "se_e2_a"}, "fitting_net": {}},
            "learning_rate": {"start_lr": 1e-3}, "loss": {},
            "training": {"training_data": {"systems": ["x"]}, "numb_steps": 1000}}
    assert normalize(keys)["learning_rate"]["stop_lr"] == DEFAULT_STOP_LR


# ---------------------------------------------------------------------------
# Shapes of the schedules
# ---------------------------------------------------------------------------


@fast
@given(case=common(), kind=st.sampled_from(sorted(LR_SCHEDULES)))
def test_warmup_climbs_to_start_lr_and_the_run_ends_at_stop_lr(case, kind):
    section, num_steps = case
    section = {**section, "type": kind, **({"decay_steps": 1} if kind == "exp" else {})}
    if kind == "wsd" and section.get("stop_lr", 1.0) == 0.0:
        section["stop_lr"] = 1e-9
    s = lr_schedule(section, num_steps)
    # (a stop_lr above start_lr is deepmd-kit's too, and checked against it above; exp then floors at stop_lr)
    assume(s.end_lr <= s.start_lr)
    W = s.n_warmup
    f = s.warmup_start_factor
    assert s.lr(0) == pytest.approx(f * s.start_lr if W else s.start_lr, rel=1e-15)
    if W:
        assert s.lr(W - 1) == pytest.approx(s.start_lr * (f + (1 - f) * (W - 1) / W), rel=1e-14)
    assert s.lr(W) == pytest.approx(s.start_lr, rel=1e-15)
    # after the last step of the run: stop_lr (exp with decay_steps 1 reaches it exactly, up to its floor)
    assert s.lr(num_steps + 5) == pytest.approx(s.end_lr, rel=1e-12, abs=1e-10 if kind == "exp" else 0.0)


@given(step=st.integers(0, 3000), S=st.integers(0, 1000), D=st.integers(1, 1000))
@settings(deadline=None)
def test_wsd_decays_monotonically_between_its_ends(step, S, D):
    for kind in WSD_DECAY_TYPES:
        here, after = wsd_decay(step, 1e-3, 1e-6, S, D, kind), wsd_decay(step + 1, 1e-3, 1e-6, S, D, kind)
        assert 1e-6 <= after <= here <= 1e-3
        assert here == (1e-3 if step <= S else 1e-6 if step >= S + D else here)


def test_exp_decay_with_a_given_rate_keeps_decay_steps_and_the_floor():
    # decay_steps 500 >= the 100-step run, yet kept: the rate is given
    assert exp_decay(499, 1.0, 0.01, 500, 100, decay_rate=0.5) == 1.0
    assert exp_decay(500, 1.0, 0.01, 500, 100, decay_rate=0.5) == 0.5
    assert exp_decay(500 * 10, 1.0, 0.01, 500, 100, decay_rate=0.5) == 0.01


# ---------------------------------------------------------------------------
# Bad settings: one line naming the key
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("section, num_steps, error, message", [
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "stop_lr_ratio": 1e-3}, 100, ValueError,
     r"exactly one of stop_lr and stop_lr_ratio is needed, got stop_lr=1e-08 and stop_lr_ratio=0\.001"),
    ({"start_lr": 0.0, "stop_lr": 1e-8}, 100, ValueError, r"start_lr: 0\.0 is not positive"),
    ({"start_lr": "1e-3", "stop_lr": 1e-8}, 100, TypeError, r"start_lr: expected a number, got str '1e-3'"),
    ({"start_lr": 1e-3, "stop_lr": -1e-8}, 100, ValueError, r"stop_lr: -1e-08 is below 0\.0"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_steps": 10, "warmup_ratio": 0.1}, 100, ValueError,
     r"warmup_steps and warmup_ratio are exclusive, got warmup_steps=10 and warmup_ratio=0\.1"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_steps": 100}, 100, ValueError,
     r"warmup_steps gives 100 warm-up steps, expected fewer than num_steps = 100"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_steps": 5}, 0, ValueError,
     r"warmup_steps gives 5 warm-up steps, expected fewer than num_steps = 0"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_ratio": 1.0}, 100, ValueError,
     r"warmup_ratio must lie in \[0, 1\), got 1\.0"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_steps": 2.0}, 100, TypeError,
     r"warmup_steps: expected an integer, got float 2\.0"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "warmup_start_factor": -0.5}, 100, ValueError,
     r"warmup_start_factor: -0\.5 is below 0\.0"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 0}, 100, ValueError,
     r"decay_steps: 0 is below 1"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "decay_rate": 1.5}, 100, ValueError,
     r"decay_rate must lie in \(0, 1\], got 1\.5"),
    ({"start_lr": 1e-3, "stop_lr": 1e-8, "smooth": "yes"}, 100, TypeError, r"smooth must be true or false, got str"),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 0.0}, 100, ValueError,
     r"the wsd schedule needs a stop_lr > 0, got 0\.0"),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-8, "decay_phase_ratio": 1.5}, 100, ValueError,
     r"decay_phase_ratio must lie in \(0, 1\], got 1\.5"),
    ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-8, "decay_type": "exp"}, 100, ValueError,
     r"decay_type must be one of \('inverse_linear', 'cosine', 'linear'\), got 'exp'"),
    ({"type": "cosine", "start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 10}, 100, ValueError,
     r"learning_rate\.decay_steps: not a key of the cosine schedule; expected \["),
    ({"type": "step", "start_lr": 1e-3}, 100, ValueError,
     r"learning_rate\.type 'step' is not supported; expected one of \['cosine', 'exp', 'wsd'\]"),
    ({"stop_lr": 1e-8}, 100, ValueError, r"learning_rate\.start_lr is missing"),
    ({"start_lr": 1e-3, "scale_by_worker": "cubic"}, 100, ValueError,
     r"learning_rate\.scale_by_worker must be 'linear', 'sqrt' or 'none', got 'cubic'"),
    ({"start_lr": 1e-3}, -1, ValueError, r"num_steps: -1 is below 0"),
])
def test_bad_settings_are_refused_in_one_line(section, num_steps, error, message):
    with pytest.raises(error, match=message) as err:
        lr_schedule(section, num_steps)
    assert "\n" not in str(err.value)
    # through the section, the message says where it comes from
    assert str(err.value).startswith("learning_rate")


def test_the_dataclasses_validate_themselves_and_are_frozen():
    with pytest.raises(ValueError, match="exactly one of stop_lr and stop_lr_ratio is needed"):
        CosineLR(start_lr=1e-3, num_steps=10)
    s = WsdLR(start_lr=1e-3, num_steps=10, stop_lr=1e-5)
    with pytest.raises(AttributeError):
        s.start_lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=re.escape("step: -1 is below 0")):
        s.lr(-1)
    with pytest.raises(TypeError, match=re.escape("learning_rate must be a mapping of keys, got list")):
        lr_schedule([1e-3], 10)  # type: ignore[arg-type]
