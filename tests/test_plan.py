"""The step planner: the source workflow's figures and SimpleTuner's arithmetic."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sd3exp.buckets import BucketRule, bucket_of
from sd3exp.errors import ConfigError
from sd3exp.plan import MAX_CHECKPOINTS, checkpoint_steps, make_plan, render_table
from sd3exp.validate import validate
from tests.helpers import compose_experiment


def test_fantasy_art_matches_the_source_and_simpletuner():
    plan = make_plan(compose_experiment("fantasy_art"), {})
    assert plan.naive_steps_per_epoch == 793.33
    assert plan.naive_max_train_steps == 23800
    assert plan.steps_per_epoch == 794  # ceil(476 x 10 / 6) in one square bucket
    assert plan.checkpoint_interval_steps == 800
    assert plan.max_train_steps == 24000
    assert plan.checkpoint_steps == list(range(800, 24001, 800))
    assert plan.concepts[0].simpletuner_repeats == 9
    assert plan.stop_rule == "max_steps"


@pytest.mark.parametrize("overrides, basis", [
    ([], "(naive x epochs: 23800.0)"),
    (["training.epochs=0", "training.max_steps=1000"], "(training.max_steps)"),  # as the demo: no naive count
])
def test_the_table_says_where_the_step_count_comes_from(overrides, basis):
    line = next(row for row in render_table(make_plan(compose_experiment("fantasy_art", overrides), {})).splitlines()
                if row.startswith("max train steps"))
    assert basis in line


def test_reference_example_three_buckets():
    """simpletuner-4.10.md: batch 4, repeats 0, buckets of 50/30/20 images -> 13 + 8 + 5 = 26."""
    cfg = compose_experiment("demo", ["training.batch_size=4", "dataset.resolution=64", "dataset.resolution_type=pixel"])
    sizes = [(64, 64)] * 50 + [(128, 64)] * 30 + [(64, 128)] * 20
    plan = make_plan(cfg, {"shapes": sizes})
    assert plan.concepts[0].buckets == {"0.50": 20, "1.00": 50, "2.00": 30}
    assert plan.steps_per_epoch == 26


def test_zero_usable_batches_is_an_error_naming_repeats():
    cfg = compose_experiment("demo", ["training.batch_size=4"])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, {"shapes": [(64, 64)] * 3})
    assert "concepts[0].repeats" in str(err.value)


def test_area_resolution_is_megapixels_and_its_minimum_keeps_wide_images():
    cfg = compose_experiment("demo", ["dataset.resolution_type=area", "dataset.resolution=0.25",
                                      "dataset.minimum_image_size=0.5", "training.batch_size=1"])
    validate(cfg)
    plan = make_plan(cfg, {"shapes": [(1500, 400), (600, 800), (700, 700)]})  # 0.6, 0.48, 0.49 MP
    assert (plan.concepts[0].images, plan.concepts[0].skipped_images, plan.steps_per_epoch) == (3, 2, 1)


@pytest.mark.parametrize("overrides, field, words", [
    (["dataset.resolution=64.5"], "dataset.resolution", "whole pixels"),
    (["dataset.resolution=abc"], "dataset.resolution", "not a number"),
    (["dataset.resolution_type=pixel_area", "dataset.minimum_image_size=2300"], "dataset.minimum_image_size",
     "5 megapixels"),
    (["dataset.resolution_type=area", "dataset.resolution=1.0", "dataset.minimum_image_size=6"],
     "dataset.minimum_image_size", "5 megapixels"),
])
def test_resolution_settings_simpletuner_would_refuse(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        validate(compose_experiment("demo", overrides))
    assert str(err.value).startswith(f"{field}=") and words in str(err.value)


def test_a_minimum_above_every_image_names_the_minimum():
    cfg = compose_experiment("demo", ["dataset.minimum_image_size=512"])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, {"shapes": [(64, 64)] * 8})
    assert str(err.value).startswith("dataset.minimum_image_size=512") and "all 8 images" in str(err.value)


def test_gradient_accumulation_divides_batches():
    cfg = compose_experiment("demo", ["training.gradient_accumulation=3", "training.batch_size=1"])
    plan = make_plan(cfg, {"shapes": [(64, 64)] * 10})
    assert plan.steps_per_epoch == math.ceil(10 / 3)


def test_asymmetric_rounding_from_the_reference():
    rule = BucketRule(64, "pixel")
    assert bucket_of((96, 64), rule) == 2.0
    assert bucket_of((64, 96), rule) == 1.0


def test_two_concepts_add_up():
    plan = make_plan(compose_experiment("two_concepts"), {})
    assert plan.steps_per_epoch == math.ceil(476 * 10 / 6) + math.ceil(240 * 4 / 6)


@settings(max_examples=200, deadline=None)
@example(n=334, passes=12, batch=1, epochs=5)  # 10,020 checkpoints: over the limit (found by hypothesis)
@given(n=st.integers(1, 400), passes=st.integers(1, 12), batch=st.integers(1, 8), epochs=st.integers(1, 5))
def test_single_bucket_formula(n, passes, batch, epochs):
    cfg = _with(_demo_cfg(), batch=batch, epochs=epochs, passes=passes)
    if n * passes < batch:
        with pytest.raises(ConfigError):
            make_plan(cfg, {"shapes": [(64, 64)] * n})
        return
    if epochs * math.ceil(n * passes / batch) // 2 > MAX_CHECKPOINTS:  # a checkpoint every 2 steps: refused
        with pytest.raises(ConfigError, match="checkpointing.every_steps=2: plans"):
            make_plan(cfg, {"shapes": [(64, 64)] * n})
        return
    plan = make_plan(cfg, {"shapes": [(64, 64)] * n})
    assert plan.steps_per_epoch == math.ceil(n * passes / batch)
    assert plan.max_train_steps == epochs * plan.steps_per_epoch
    assert plan.checkpoint_steps == list(range(2, plan.max_train_steps + 1, 2))


@given(max_steps=st.integers(1, 5000), every=st.integers(1, 700))
def test_checkpoint_steps_are_multiples_up_to_max(max_steps, every):
    steps = checkpoint_steps(max_steps, every, None, 10)
    assert steps == [s for s in range(1, max_steps + 1) if s % every == 0]


_BASE = {}


def _demo_cfg():
    if "demo" not in _BASE:
        _BASE["demo"] = compose_experiment("demo")
    return _BASE["demo"]


def _with(cfg, batch, epochs, passes):
    from dataclasses import replace

    concept = replace(cfg.concepts[0], repeats=passes)
    training = replace(cfg.training, batch_size=batch, epochs=epochs, max_steps=0)
    return replace(cfg, concepts=[concept], training=training, checkpointing=replace(cfg.checkpointing, every_steps=2))


def test_processes_split_each_bucket_before_batching():
    """SimpleTuner splits bucket images across ranks (rank 0 gets ceil(n/P)), then batches per rank."""
    cfg = compose_experiment("demo", ["training.num_processes=2", "training.batch_size=2",
                                      "concepts.0.repeats=3"])
    plan = make_plan(cfg, {"shapes": [(64, 64)] * 9 + [(128, 64)] * 4})
    # bucket 1.0: ceil(9/2)=5 images x 3 passes = 15 -> 8 batches; bucket 2.0: 2 x 3 = 6 -> 3 batches
    assert plan.steps_per_epoch == 11
    assert plan.effective_batch == 4
