"""SimpleTuner 4.10.1's small-bucket rule (prune / pad / abort) against its own code, and the
planner's refusal of what aborts (issue 18 item 5)."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from sd3exp.buckets import BucketTrainer, bucket_fate
from sd3exp.errors import ConfigError
from sd3exp.plan import make_plan
from tests.helpers import compose_experiment, needs_trainer, run_cli, trainer_python

REFERENCE = Path(__file__).with_name("simpletuner_bucket_fate.py")


def cases(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buckets = {f"{k:.2f}": rng.randint(1, 12) for k in rng.sample([0.5, 0.75, 1.0, 1.5, 2.0], rng.randint(1, 3))}
        out.append([buckets, rng.choice([0, 0, 1, 3]), rng.randint(1, 6), rng.choice([1, 1, 2, 3, 4]),
                    rng.choice([1, 1, 2, 3]), rng.random() < 0.3, rng.random() < 0.4])
    return out


def ours(buckets, repeats, batch, processes, grad_accum, pruning, oversubscription):
    trainer = BucketTrainer(batch, processes, grad_accum, pruning, oversubscription)
    fates = {k: bucket_fate(n, repeats, trainer) for k, n in buckets.items()}
    if any(f == "aborts" for f, _ in fates.values()):
        return "aborts"
    return {k: samples for k, (f, samples) in fates.items() if f != "pruned"}


@needs_trainer
def test_bucket_fate_matches_simpletuner():
    todo = cases(600, seed=18) + [[{"0.50": 1, "1.00": 5, "2.00": 5}, 0, 2, 1, 1, False, False]]
    out = subprocess.run([str(trainer_python()), str(REFERENCE)], input=json.dumps(todo), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = [(c, e, ours(*c)) for c, e in zip(todo, expected) if e != ours(*c)]
    assert not wrong, wrong[:5]
    assert expected[-1] == "aborts"  # the case: one portrait beside 5 square and 5 wide images


def odd_sizes() -> list:
    """5 square, 5 landscape 2:1 and one portrait (an EXIF-rotated 128x64), at resolution 64."""
    return [(64, 64)] * 5 + [(128, 64)] * 5 + [(64, 128)]


def test_lone_portrait_is_refused_naming_bucket_images_and_fixes():
    cfg = compose_experiment("demo_quick", ["training.batch_size=2"])
    names = [f"sq{i}.png" for i in range(5)] + [f"wide{i}.png" for i in range(5)] + ["portrait.jpg"]
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, {"shapes": odd_sizes()}, names={"shapes": names})
    text = str(err.value)
    for words in ("bucket 0.50", "portrait.jpg", "zero usable batches", "concepts.0.repeats=2",
                  "dataset.allow_oversubscription=true", "remove"):
        assert words in text
    assert "sq0.png" not in text


@pytest.mark.parametrize("fix", [["concepts.0.repeats=2"], ["dataset.allow_oversubscription=true"],
                                 ["training.batch_size=1"]])
def test_each_printed_fix_plans(fix):
    cfg = compose_experiment("demo_quick", ["training.batch_size=2", *fix])
    plan = make_plan(cfg, {"shapes": odd_sizes()})
    assert "0.50" in plan.concepts[0].buckets


def test_oversubscription_is_no_fix_with_repeats():
    """SimpleTuner pads only a dataset whose repeats is 0; the message says so."""
    cfg = compose_experiment("demo_quick", ["training.batch_size=4", "dataset.allow_oversubscription=true",
                                            "concepts.0.repeats=2"])
    with pytest.raises(ConfigError, match="concepts.0.repeats=1"):
        make_plan(cfg, {"shapes": odd_sizes()})


def test_small_bucket_is_pruned_only_with_a_minimum_image_size():
    cfg = compose_experiment("demo", ["training.batch_size=4", "dataset.minimum_image_size=32"])
    plan = make_plan(cfg, {"shapes": [(64, 64)] * 8 + [(128, 64)] * 3})
    assert plan.concepts[0].pruned_buckets == {"2.00": 3}
    assert plan.steps_per_epoch == 2
    assert any("pruned" in w for w in plan.warnings)


def test_processes_and_accumulation_count_in_the_effective_batch():
    cfg = compose_experiment("demo", ["training.batch_size=2", "training.gradient_accumulation=2",
                                      "training.num_processes=2"])
    with pytest.raises(ConfigError, match=r"= 8\)"):
        make_plan(cfg, {"shapes": [(64, 64)] * 8 + [(128, 64)] * 7})


def odd_dataset(folder: Path) -> Path:
    """On disk: 5 square, 5 landscape 2:1 and one portrait stored 128x64 with EXIF orientation 6."""
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(folder / f"sq{i}.png")
        (folder / f"sq{i}.txt").write_text("k4s4, a red square")
        Image.new("RGB", (128, 64), (0, 40 * i, 0)).save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text("k4s4, a green band")
    portrait = Image.new("RGB", (128, 64), (0, 0, 200))
    exif = portrait.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: a 64x128 portrait when shown
    portrait.save(folder / "portrait.jpg", exif=exif)
    (folder / "portrait.txt").write_text("k4s4, a blue portrait")
    return folder


def tqdm_totals(log: Path) -> set:
    return {int(m) for m in re.findall(r"Steps:\s*\d+%\|[^|]*\|\s*\d+/(\d+)", log.read_text(errors="replace"))}


@needs_trainer
@pytest.mark.slow
def test_odd_bucket_is_refused_before_any_write_and_the_printed_fix_trains(tmp_path):
    data = odd_dataset(tmp_path / "odd")
    before = sorted(p.name for p in data.iterdir())
    run = tmp_path / "run"
    args = ["experiment=demo_quick", f"concepts.0.path={data}", "training.batch_size=2", "stage=train",
            f"hydra.run.dir={run}"]
    out = run_cli(*args)
    assert out.returncode != 0
    assert "bucket 0.50" in out.stderr and "portrait.jpg" in out.stderr and "zero usable batches" in out.stderr
    assert "Traceback" not in out.stderr and not run.exists()
    fix = re.search(r"(dataset\.allow_oversubscription=true)", out.stderr).group(1)
    out = run_cli(*args, fix, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["concepts"][0]["padded_buckets"] == {"0.50": 1}
    assert tqdm_totals(run / "train.log") == {plan["max_train_steps"]}  # SimpleTuner's own count, as planned
    assert json.loads((run / "config" / "config.json").read_text())["allow_dataset_oversubscription"] is True
    assert sorted(p.name for p in data.iterdir()) == before
