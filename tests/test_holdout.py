"""concepts[].holdout: which images are held out (seeded, recorded), how plan, prepare and compile treat them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd3exp import holdout, job
from sd3exp import prepare as prep
from sd3exp.compile import data_backends, trainer_args
from sd3exp.demo import DEMO_COUNTS
from sd3exp.plan import make_plan
from sd3exp.project import ROOT
from sd3exp.schema import ConceptConfig
from tests.helpers import compose_experiment, run_cli
from tests.test_prepare import source_state, write_dataset

HELD = ["concepts.0.holdout=3", "trainer.report_to=simpletuner"]
N = sum(DEMO_COUNTS.values())  # the demo dataset's images


def concept(n: int) -> ConceptConfig:
    return ConceptConfig(id="art", path="/nowhere", trigger="k4s4", holdout=n)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.from_regex(r"[a-z]{1,6}\.png", fullmatch=True), min_size=2, max_size=40, unique=True),
       seed=st.integers(0, 2**31), data=st.data())
def test_the_choice_is_a_seeded_subset_of_the_asked_size_whatever_the_listing_order(names, seed, data):
    n = data.draw(st.integers(1, len(names) - 1))
    chosen = holdout.held_out(concept(n), names, seed)
    assert len(chosen) == n and set(chosen) <= set(names) and chosen == sorted(chosen)
    assert holdout.held_out(concept(n), list(reversed(names)), seed) == chosen
    assert holdout.held_out(concept(0), names, seed) == []


def test_the_choice_depends_on_the_seed_and_the_concept():
    names = [f"img{i:03d}.png" for i in range(100)]
    base = holdout.held_out(concept(10), names, 1)
    assert holdout.held_out(concept(10), names, 2) != base
    assert holdout.held_out(replace(concept(10), id="other"), names, 1) != base
    code = ("from sd3exp import holdout; from sd3exp.schema import ConceptConfig; "
            "print(holdout.held_out(ConceptConfig(id='art', path='/nowhere', trigger='k4s4', holdout=10), "
            "[f'img{i:03d}.png' for i in range(100)], 1))")
    for hash_seed in ("1", "2"):  # another process, another str-hash seed: the same choice
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=ROOT)
        assert other.stdout.strip() == str(base)


def demo_quick(tmp_path: Path, *overrides: str):
    return compose_experiment("demo_quick", [*overrides, f"dataset.prepared_dir={tmp_path}/dataset"],
                              run_dir=str(tmp_path / "run"))


def test_the_plan_counts_only_trained_images_and_records_the_held_out_ones(tmp_path):
    cfg = job.absolute_paths(demo_quick(tmp_path, *HELD))
    held = job.held_out_images(cfg)["shapes"]
    plan = make_plan(cfg, job.concept_sizes(cfg), job.held_out_images(cfg))
    full = make_plan(cfg, job.concept_sizes(replace(cfg, concepts=[replace(cfg.concepts[0], holdout=0)])))
    c = plan.to_dict()["concepts"][0]
    assert c["images"] == full.concepts[0].images - 3 and c["held_out"] == held and len(held) == 3
    assert plan.naive_steps_per_epoch == (full.concepts[0].images - 3) / cfg.training.batch_size
    assert sum(plan.concepts[0].buckets.values()) == c["images"]
    assert "held_out" not in full.to_dict()["concepts"][0]  # nothing held out: plan.json as before


def test_compile_adds_an_eval_dataset_and_the_eval_interval(tmp_path):
    cfg = job.absolute_paths(demo_quick(tmp_path, *HELD))
    plan = replace(make_plan(cfg, job.concept_sizes(cfg), job.held_out_images(cfg)),
                   cache_dir=str(tmp_path / "cache"))
    backends = data_backends(cfg, plan, tmp_path / "run")
    train, evaluation = backends[0], backends[1]
    assert [b["id"] for b in backends] == ["shapes", "shapes.holdout", "text-embeds"]
    assert evaluation["dataset_type"] == "eval" and "dataset_type" not in train
    assert evaluation["instance_data_dir"] == f"{tmp_path}/dataset/shapes.holdout"
    assert evaluation["cache_dir_vae"] == f"{tmp_path}/cache/vae/shapes.holdout" != train["cache_dir_vae"]
    assert evaluation["repeats"] == 0 and "caption_shuffle" not in evaluation and "probability" not in evaluation
    args = {a.name: a.value for a in trainer_args(cfg, plan, tmp_path / "run")}
    assert args["eval_steps_interval"] == plan.checkpoint_interval_steps == 2 and args["num_eval_images"] == 3
    assert "validation_disable" not in args  # it would switch SimpleTuner's eval loss off too
    assert args["validation_disable_unconditional"] is True and args["disable_benchmark"] is True
    args = {a.name: a.value for a in trainer_args(replace(cfg, validation=replace(cfg.validation, loss_every_steps=5)),
                                                   plan, tmp_path / "run")}
    assert args["eval_steps_interval"] == 5


def test_no_holdout_compiles_as_before(tmp_path):
    cfg = job.absolute_paths(demo_quick(tmp_path))
    plan = replace(make_plan(cfg, job.concept_sizes(cfg)), cache_dir=str(tmp_path / "cache"))
    assert [b["id"] for b in data_backends(cfg, plan, tmp_path / "run")] == ["shapes", "text-embeds"]
    args = {a.name: a.value for a in trainer_args(cfg, plan, tmp_path / "run")}
    assert args["validation_disable"] is True and "eval_steps_interval" not in args


def test_prepare_keeps_held_out_images_apart_and_the_source_untouched(tmp_path):
    src = write_dataset(tmp_path / "src", 10)
    before = source_state(src)
    root = tmp_path / "prepared"
    cfg = compose_experiment(None, ["+concepts=[{id: art, path: x, trigger: k4s4, holdout: 3}]",
                                    f"dataset.prepared_dir={root}", "trainer.report_to=simpletuner"])
    cfg = replace(cfg, concepts=[replace(cfg.concepts[0], path=str(src))])
    summary = prep.prepare(cfg, progress=False)
    held = holdout.held_out(cfg.concepts[0], [p.name for p in src.glob("*.png")], cfg.seed)
    trained = sorted(p.name for p in (root / "art").glob("*.png"))
    assert sorted(p.name for p in (root / "art.holdout").glob("*.png")) == held and len(trained) == 7
    assert not set(held) & set(trained)
    for name in held:  # each held-out image once, with its caption as is
        assert (root / "art.holdout" / name).with_suffix(".txt").read_bytes() == (src / name).with_suffix(".txt").read_bytes()
    manifest = json.loads((root / prep.MANIFEST).read_text())["concepts"]["art"]
    assert manifest["held_out"] == held and manifest["images"] == 7 and manifest["held_out_seed"] == cfg.seed
    assert "+3 held out" in summary.line() and source_state(src) == before
    prep.prepare(replace(cfg, concepts=[replace(cfg.concepts[0], holdout=0)]), progress=False)
    assert not (root / "art.holdout").exists() and len(list((root / "art").glob("*.png"))) == 10
    assert source_state(src) == before


def test_a_folder_of_the_user_where_the_held_out_ones_go_is_refused(tmp_path):
    src = write_dataset(tmp_path / "src", 6)
    root = tmp_path / "prepared"
    (root / "art.holdout").mkdir(parents=True)
    (root / "art.holdout" / "mine.txt").write_text("keep me")
    cfg = compose_experiment(None, ["+concepts=[{id: art, path: x, trigger: k4s4, holdout: 2}]",
                                    f"dataset.prepared_dir={root}", "trainer.report_to=simpletuner"])
    with pytest.raises(prep.DatasetError, match="art.holdout exists but was not made by sd3exp"):
        prep.prepare(replace(cfg, concepts=[replace(cfg.concepts[0], path=str(src))]), progress=False)
    assert (root / "art.holdout" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("overrides, needles", [
    ([f"concepts.0.holdout={N}", "trainer.report_to=simpletuner"],
     ["concepts[0].holdout", f"={N}:", "leaving 0 to train on", f"concepts[0].holdout to at most {N - 1}"]),
    (["concepts.0.holdout=-1", "trainer.report_to=simpletuner"], ["concepts[0].holdout", "-1", "must be >= 0"]),
    (["concepts.0.holdout=2"], ["trainer.report_to", "none", "trainer.report_to=simpletuner"]),
    (["concepts.0.holdout=2", "trainer.report_to=simpletuner", "validation.loss_every_steps=0"],
     ["validation.loss_every_steps", "must be > 0"]),
])
def test_a_holdout_that_cannot_work_is_refused_naming_field_value_and_fix(tmp_path, overrides, needles):
    out = run_cli("experiment=demo_quick", *overrides, "stage=plan", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_the_printed_fix_works(tmp_path):
    out = run_cli("experiment=demo_quick", f"concepts.0.holdout={N - 1}", "trainer.report_to=simpletuner", "stage=plan",
                  "training.batch_size=1", f"hydra.run.dir={tmp_path / 'run'}")  # one image: a batch of one
    assert out.returncode == 0, out.stderr
    assert f"1 (disk, +{N - 1} held out)" in out.stdout
