"""The held-out loss through the CLI: real SimpleTuner 4.10.1 logs loss/val/<id>.holdout (trainer, slow)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from sd3exp.demo import DEMO_COUNTS
from sd3exp.project import ROOT
from tests.helpers import needs_trainer, run_cli

pytestmark = [needs_trainer, pytest.mark.slow]


def digests(folder: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_held_out_images_give_simpletuners_validation_loss_at_every_checkpoint(tmp_path):
    """demo_quick holding 2 of its images out: they are not trained on (nor counted in the plan), SimpleTuner
    computes the validation loss on them at each checkpoint step, and the eval draws it in training.png."""
    run, source = tmp_path / "run", ROOT / "data" / "demo" / "shapes"
    before = digests(source)
    out = run_cli("experiment=demo_quick", "concepts.0.holdout=2", "trainer.report_to=simpletuner",
                  f"hydra.run.dir={run}", timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    concept = plan["concepts"][0]
    n = sum(DEMO_COUNTS.values()) - 2
    assert len(concept["held_out"]) == 2 and concept["images"] == n and sum(concept["buckets"].values()) == n
    trained = {p.name for p in (run / "dataset" / "shapes").glob("*.png")}
    held = {p.name for p in (run / "dataset" / "shapes.holdout").glob("*.png")}
    assert held == set(concept["held_out"]) and not held & trained and len(trained) == n
    assert digests(source) == before  # the user's dataset is only read
    records = [json.loads(line) for line in (run / "training" / "training_metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["metrics"]["loss/val/shapes.holdout"] for r in records
           if "loss/val/shapes.holdout" in r["metrics"]}
    assert sorted(val) == plan["checkpoint_steps"] and len(val) >= 2, val  # eval_steps_interval = checkpoints
    assert all(math.isfinite(v) and v > 0 for v in val.values()), val
    assert (run / "eval" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="training.png"' in (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "+2 held out for the validation loss" in out.stdout
