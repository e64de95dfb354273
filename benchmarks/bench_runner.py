"""Runner overhead: `sd3exp ... stage=train` against `simpletuner train` started by hand
on the same compiled, prepared run (same environment), wall time side by side.

    .venv/bin/python benchmarks/bench_runner.py [--repeats N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sd3exp import trainer_env  # noqa: E402
from sd3exp.train import trainer_environment  # noqa: E402


def sd3exp_train(run: Path) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "sd3exp", "experiment=demo", "stage=train", f"hydra.run.dir={run}"],
                   cwd=ROOT, check=True, capture_output=True)
    return time.monotonic() - start


def by_hand(run: Path) -> float:
    env = trainer_env.locate(None, trainer_env.DEFAULT_VERSION, None)
    start = time.monotonic()
    subprocess.run([str(env.bin / "simpletuner"), "train"], cwd=run, check=True, capture_output=True,
                   env=trainer_environment(env.bin, run, cpu=True, offline=True))
    return time.monotonic() - start


def fresh_copy(template: Path, dest: Path) -> Path:
    """The compiled, prepared run without any training output."""
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns("training", "train.log",
                                                                                  "training_summary.json"))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    n = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template"
        subprocess.run([sys.executable, "-m", "sd3exp", "experiment=demo", "stage=prepare",
                        f"hydra.run.dir={template}"], cwd=ROOT, check=True, capture_output=True)
        ours, hand = [], []
        for i in range(n):
            hand.append(by_hand(fresh_copy(template, Path(tmp) / f"hand{i}")))
            ours.append(sd3exp_train(fresh_copy(template, Path(tmp) / f"ours{i}")))
    for name, times in (("simpletuner train (by hand)", hand), ("sd3exp stage=train", ours)):
        print(f"{name:<30} " + "  ".join(f"{t:6.1f}s" for t in times) + f"   min {min(times):6.1f}s")
    print(f"ratio sd3exp / by hand (min): {min(ours) / min(hand):.3f}  "
          f"(overhead {min(ours) - min(hand):+.1f}s: compose, plan, audit, prepare check, preflight parse)")


if __name__ == "__main__":
    main()
