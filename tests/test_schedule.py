"""The LR curve in plan.json is the one SimpleTuner's schedulers really produce."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from sd3exp import schedule
from sd3exp.errors import ConfigError
from sd3exp.schema import ScheduleConfig
from tests.helpers import needs_trainer, trainer_python

REFERENCE = Path(__file__).with_name("simpletuner_lr.py")
CASES = [ScheduleConfig("constant"), ScheduleConfig("constant", warmup_steps=20),
         ScheduleConfig("cosine"), ScheduleConfig("cosine", final_lr=1e-5),
         ScheduleConfig("linear", warmup_fraction=0.1), ScheduleConfig("polynomial", warmup_steps=10, power=2.0, final_lr=1e-6)]
LR, STEPS = 1e-4, 200


def test_cosine_is_one_decay_over_the_run():
    sched = schedule.to_trainer(ScheduleConfig("cosine"), LR, STEPS)
    assert (sched.scheduler, sched.warmup_steps) == ("cosine", STEPS)
    assert schedule.lr_at(0, sched, LR, STEPS) == LR
    assert schedule.lr_at(STEPS, sched, LR, STEPS) == 0
    assert math.isclose(schedule.lr_at(STEPS // 2, sched, LR, STEPS), LR / 2, rel_tol=1e-6)


def test_cosine_with_warmup_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="period"):
        schedule.to_trainer(ScheduleConfig("cosine", warmup_steps=10), LR, STEPS)


@needs_trainer
def test_curves_match_simpletuner():
    jobs = [dict(asdict(schedule.to_trainer(c, LR, STEPS)), lr=LR, max_steps=STEPS) for c in CASES]
    out = subprocess.run([str(trainer_python()), str(REFERENCE)], input=json.dumps(jobs), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for case, job, real in zip(CASES, jobs, json.loads(out.stdout.strip().splitlines()[-1])):
        sched = schedule.TrainerSchedule(job["scheduler"], job["warmup_steps"], job["lr_end"], job["power"])
        ours = [schedule.lr_at(s, sched, LR, STEPS) for s in range(STEPS + 1)]
        bad = [(s, o, r) for s, (o, r) in enumerate(zip(ours, real)) if not math.isclose(o, r, rel_tol=1e-6, abs_tol=1e-12)]
        assert not bad, (case, bad[:3])
