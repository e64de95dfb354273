"""The selection rule: objective and direction, guards, ties to the earlier step, the base never chosen."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sd3exp.errors import ConfigError
from sd3exp.evaluate.select import Candidate, choose, make_rule, mean_scores


def cand(label: str, step, memorised: int = 0, **scores: float) -> Candidate:
    return Candidate(label, step, scores, cells=2, failed=0, memorised=memorised)


def test_the_highest_objective_wins_and_the_base_model_is_never_chosen():
    rule = make_rule("pixel_fidelity", None, {}, {}, False)
    choice = choose([cand("base", None, pixel_fidelity=99.0), cand("checkpoint-2", 2, pixel_fidelity=60.0),
                     cand("checkpoint-4", 4, pixel_fidelity=80.0), cand("final", None, pixel_fidelity=70.0)], rule)
    assert choice.best.label == "checkpoint-4"
    assert [c.label for c in choice.ranked] == ["checkpoint-4", "final", "checkpoint-2"]
    assert [c.label for c, _ in choice.excluded] == ["base"]


def test_min_direction_guards_and_memorisation():
    rule = make_rule("drift", None, {"pixel_fidelity": 50.0}, {}, True)
    assert rule.direction == "min"
    choice = choose([cand("checkpoint-2", 2, drift=1.0, pixel_fidelity=40.0),
                     cand("checkpoint-4", 4, memorised=1, drift=2.0, pixel_fidelity=90.0),
                     cand("checkpoint-6", 6, drift=3.0, pixel_fidelity=70.0)], rule)
    assert choice.best.label == "checkpoint-6"
    assert dict((c.label, why) for c, why in choice.excluded) == {
        "checkpoint-2": "pixel_fidelity 40 < 50", "checkpoint-4": "1 memorised cell(s)"}
    assert rule.text() == "lowest mean drift where pixel_fidelity >= 50 and no memorised cell; " \
                          "ties go to the earlier step"


def test_no_eligible_checkpoint_is_no_choice():
    rule = make_rule("clip_t", None, {}, {}, False)
    assert choose([cand("checkpoint-2", 2, pixel_fidelity=1.0)], rule).best is None


def test_an_unknown_measure_or_direction_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"eval\.select\.objective='fidelity'.*pixel_fidelity"):
        make_rule("fidelity", None, {}, {}, False)
    with pytest.raises(ConfigError, match=r"eval\.select\.at_least='x'"):
        make_rule("drift", None, {"x": 1.0}, {}, False)
    with pytest.raises(ConfigError, match=r"eval\.select\.direction='up'"):
        make_rule("drift", "up", {}, {}, False)


def test_mean_scores_leave_failed_cells_out_and_count_them():
    cells = [{"label": "checkpoint-2", "step": 2, "status": "ok", "scores": {"drift": 1.0}, "memorised": False},
             {"label": "checkpoint-2", "step": 2, "status": "ok", "scores": {"drift": 3.0}, "memorised": True},
             {"label": "checkpoint-2", "step": 2, "status": "error", "scores": {}, "memorised": None},
             {"label": "checkpoint-4", "step": 4, "status": "error", "scores": {}, "memorised": None}]
    two, four = mean_scores(cells)
    assert (two.scores, two.cells, two.failed, two.memorised) == ({"drift": 2.0}, 2, 1, 1)
    assert (four.scores, four.cells, four.failed) == ({}, 0, 1)


scores = st.lists(st.integers(0, 5), min_size=1, max_size=8)  # few values: many ties


@given(scores, st.sampled_from(["max", "min"]))
def test_the_choice_is_optimal_and_ties_go_to_the_earlier_step(values, direction):
    candidates = [cand(f"checkpoint-{2 * (i + 1)}", 2 * (i + 1), pixel_fidelity=float(v))
                  for i, v in enumerate(values)] + [cand("final", None, pixel_fidelity=float(values[-1]))]
    best = choose(candidates, make_rule("pixel_fidelity", direction, {}, {}, False)).best
    target = (max if direction == "max" else min)(values)
    assert best.scores["pixel_fidelity"] == target
    first = next(c for c in candidates if c.scores["pixel_fidelity"] == target)
    assert best.label == first.label  # the earliest step with the best score; final counts as the latest


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=6), st.floats(0, 100))
def test_every_chosen_checkpoint_passes_the_guards(values, low):
    candidates = [cand(f"checkpoint-{i}", i, drift=v, pixel_fidelity=100 - v) for i, v in enumerate(values)]
    choice = choose(candidates, make_rule("drift", "min", {"pixel_fidelity": low}, {}, False))
    assert all(c.scores["pixel_fidelity"] >= low for c in choice.ranked)
    assert len(choice.ranked) + len(choice.excluded) == len(candidates)
    assert (choice.best is None) == all(100 - v < low for v in values)


def test_a_nan_score_is_never_chosen():
    rule = make_rule("pixel_fidelity", None, {}, {}, False)
    choice = choose([cand("checkpoint-2", 2, pixel_fidelity=math.nan), cand("checkpoint-4", 4, pixel_fidelity=1.0)],
                    rule)
    assert choice.best.label == "checkpoint-4"
