"""The early-stopping rule and the self-refreshing report of the live evaluation (sd3exp/live/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sd3exp.errors import ConfigError
from sd3exp.live import REFRESH_S, LiveState, Point, Watcher, check, enabled, set_refresh, stalled, summary_lines
from tests.helpers import compose_experiment


def points(*values):
    return [Point(step=2 * (i + 1), value=v) for i, v in enumerate(values)]


def test_stalls_after_patience_checkpoints_without_improvement():
    assert stalled(points(1.0, 2.0, 2.0), "max", patience=2, min_delta=0.0) is None
    reason = stalled(points(1.0, 2.0, 2.0, 1.5), "max", patience=2, min_delta=0.0)
    assert reason is not None and "best step 4" in reason and "2 checkpoint(s)" in reason


def test_min_delta_and_direction():
    assert stalled(points(10.0, 10.05, 10.08), "max", patience=2, min_delta=0.1) is not None
    assert stalled(points(10.0, 10.2, 10.4), "max", patience=2, min_delta=0.1) is None
    assert stalled(points(5.0, 4.0, 3.0), "min", patience=1, min_delta=0.0) is None
    assert stalled(points(5.0, 4.0, 3.0), "max", patience=2, min_delta=0.0) is not None


def test_unscored_checkpoints_count_as_no_improvement():
    assert stalled(points(1.0, None, None), "max", patience=2, min_delta=0.0) is not None
    assert stalled(points(None, None), "max", patience=1, min_delta=0.0) is None  # nothing scored yet


def test_order_is_by_step_not_by_arrival():
    found = [Point(6, 1.0), Point(2, 3.0), Point(4, 2.0)]
    assert "best step 2" in stalled(found, "max", patience=2, min_delta=0.0)


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=12), st.integers(1, 5))
def test_a_strictly_improving_run_never_stops(values, patience):
    assert stalled(points(*sorted(set(values))), "max", patience, 0.0) is None
    assert stalled(points(*sorted(set(values), reverse=True)), "min", patience, 0.0) is None


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=12), st.integers(1, 5), st.floats(0, 5))
def test_stops_exactly_when_the_best_is_patience_or_more_checkpoints_old(values, patience, delta):
    found = points(*values)
    best_i, best = 0, values[0]
    for i, v in enumerate(values[1:], 1):
        if v - best > delta:
            best_i, best = i, v
    assert (stalled(found, "max", patience, delta) is not None) == (len(values) - 1 - best_i >= patience)


def test_report_refresh_is_added_once_and_removed(tmp_path: Path):
    report = tmp_path / "report.html"
    report.write_text("<!doctype html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n</head></html>\n")
    set_refresh(report, True)
    set_refresh(report, True)
    text = report.read_text()
    assert text.count(f'http-equiv="refresh" content="{REFRESH_S}"') == 1
    set_refresh(report, False)
    assert "refresh" not in report.read_text()


def test_live_state_round_trips(tmp_path: Path):
    state = LiveState(points(1.0, None), ["steps 2: boom"], {"step": 4, "objective": "drift", "reason": "r"})
    state.save(tmp_path / "live.json")
    assert LiveState.load(tmp_path / "live.json") == state


@pytest.mark.parametrize("overrides, field", [
    (["training.early_stop.patience=-1"], "training.early_stop.patience"),
    (["training.early_stop.patience=2", "training.early_stop.min_delta=-0.5"], "training.early_stop.min_delta"),
    (["training.early_stop.patience=2", "training.early_stop.objective=sharpness"], "training.early_stop.objective"),
    (["training.early_stop.patience=2", "eval.backend=none"], "training.early_stop.patience"),
    (["training.early_stop.patience=2", "eval.scoring.enabled=false"], "training.early_stop.patience"),
])
def test_early_stopping_that_could_never_stop_is_refused(overrides, field):
    cfg = compose_experiment("demo_quick", overrides)
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert err.value.field == field and "Fix:" in str(err.value)


def test_a_sound_early_stopping_set_up_passes_and_turns_live_evaluation_on():
    cfg = compose_experiment("demo_quick", ["training.early_stop.patience=2"])
    check(cfg)
    assert enabled(cfg) and not enabled(compose_experiment("demo_quick"))


def test_a_failing_live_evaluation_is_recorded_and_named_in_the_summary(tmp_path: Path):
    """A ComfyUI server that is not there: the evaluation fails, the watcher records it and goes on."""
    run, training = tmp_path / "run", tmp_path / "run" / "training"
    (training / "checkpoint-2").mkdir(parents=True)
    (training / "checkpoint-2" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    cfg = compose_experiment("demo_quick", ["eval.live=true", "eval.backend=comfyui", "eval.url=http://127.0.0.1:9",
                                            f"paths.training_dir={training}"], run_dir=str(run))
    watcher = Watcher(cfg, run)
    watcher.evaluate(watcher.new_steps(), live=True)
    assert watcher.new_steps() == []  # not tried again at every poll
    lines = summary_lines(run)
    assert len(lines) == 1 and lines[0].startswith("live evaluation failed: steps 2: ")
