"""Our port of SimpleTuner's aspect-bucket rounding against SimpleTuner's own code."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from sd3exp.buckets import BucketRule, bucket_of, too_small
from tests.helpers import needs_trainer, trainer_python

REFERENCE = Path(__file__).with_name("simpletuner_buckets.py")
MIN_SIZE_REFERENCE = Path(__file__).with_name("simpletuner_min_size.py")


def sizes(n: int, seed: int) -> list:
    rng = random.Random(seed)
    cases = [[rng.randint(32, 4000), rng.randint(32, 4000), rng.choice([64, 256, 512, 768, 1024]),
              rng.choice(["pixel", "pixel_area"])] for _ in range(n)]
    edge = [[w, h, 64, t] for w, h in [(96, 64), (64, 96), (64, 64), (128, 64), (64, 128), (100, 64)]
            for t in ("pixel", "pixel_area")]
    return cases + edge + [[1000, 1000, 1024, "pixel_area"], [1024, 1024, 1024, "pixel_area"], [1500, 1000, 1.0, "area"]]


@needs_trainer
def test_bucket_keys_match_simpletuner():
    cases = sizes(2000, seed=7)
    out = subprocess.run([str(trainer_python()), str(REFERENCE)], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [bucket_of((w, h), BucketRule(res, rtype)) for w, h, res, rtype in cases]
    wrong = [(c, e, o) for c, e, o in zip(cases, expected, ours) if e != o]
    assert not wrong, wrong[:5]


def test_square_crop_is_one_bucket():
    rule = BucketRule(1024, "pixel_area", crop=True, crop_aspect="square")
    assert {bucket_of((w, h), rule) for w, h in [(1000, 3000), (4000, 1000), (1024, 1024)]} == {1.0}


def test_minimum_image_size_skips():
    rule = BucketRule(1024, "pixel_area", minimum_image_size=512)
    assert bucket_of((300, 800), rule) is None and bucket_of((600, 800), rule) is not None


def minimum_cases(n: int, seed: int) -> list:
    """(width, height, resolution, resolution_type, minimum, crop, crop_aspect), near the thresholds."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        rtype = rng.choice(["pixel", "pixel_area", "area"])
        res, minimum = (rng.choice([0.25, 0.5, 1.0]), rng.choice([0.1, 0.25, 0.5, 1.0, 2.0])) if rtype == "area" \
            else (rng.choice([512, 1024]), rng.choice([256, 512, 768, 1024, 2000]))
        edge = int((minimum * 1e6) ** 0.5) if rtype == "area" else minimum
        w, h = (max(16, edge + rng.randint(-64, 64)) if rng.random() < 0.5 else rng.randint(64, 4000) for _ in "wh")
        cases.append([w, h, res, rtype, minimum, rng.random() < 0.5, rng.choice(["square", "preserve"])])
    return cases + [[2000, 600, 1024, "pixel_area", 1024, False, "square"], [1024, 1024, 1024, "pixel_area", 1024, False,
                                                                               "square"]]


@needs_trainer
def test_minimum_image_size_matches_simpletuner():
    cases = minimum_cases(3000, seed=11)
    out = subprocess.run([str(trainer_python()), str(MIN_SIZE_REFERENCE)], input=json.dumps(cases),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [not too_small((w, h), BucketRule(res, t, crop, aspect, m)) for w, h, res, t, m, crop, aspect in cases]
    wrong = [(c, e, o) for c, e, o in zip(cases, expected, ours) if e != o]
    assert not wrong, wrong[:5]
    assert sum(expected) not in (0, len(cases))  # both outcomes were exercised
