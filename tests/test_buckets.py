"""Our port of SimpleTuner's aspect-bucket rounding against SimpleTuner's own code."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from sd3exp.buckets import BucketRule, bucket_of
from tests.conftest import needs_trainer, trainer_python

REFERENCE = Path(__file__).with_name("simpletuner_buckets.py")


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
