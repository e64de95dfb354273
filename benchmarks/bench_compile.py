"""Whole-process time of `python -m sd3exp ... stage=compile`: one run, and a 50-job multirun.

    .venv/bin/python benchmarks/bench_compile.py [--repeat 3]

Everything is written under a temporary folder (hydra.run.dir / hydra.sweep.dir).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
GRID = ["optimizer.lr=range(1e-5,1.1e-4,1e-5)", "lora.rank=4,8,16,32,64"]  # 10 x 5 = 50 jobs


def timed(args: List[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sd3exp", *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def single(tmp: Path, i: int) -> float:
    return timed(["experiment=fantasy_art", "stage=compile", f"hydra.run.dir={tmp / f'single{i}'}"])


def sweep(tmp: Path, i: int) -> float:
    sweep_dir = tmp / f"sweep{i}"
    seconds = timed(["-m", "experiment=fantasy_art_lora", *GRID, "stage=compile", f"hydra.sweep.dir={sweep_dir}"])
    jobs = len([p for p in sweep_dir.iterdir() if (p / "config" / "config.env").is_file()])
    assert jobs == 50, f"expected 50 compiled jobs, found {jobs}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sd3exp-bench-") as tmp:
        ones = [single(Path(tmp), i) for i in range(args.repeat)]
        sweeps = [sweep(Path(tmp), i) for i in range(args.repeat)]
    print(f"single compile (fantasy_art):  median {statistics.median(ones):.2f} s  "
          f"(min {min(ones):.2f}, max {max(ones):.2f}, n={len(ones)})")
    s = statistics.median(sweeps)
    print(f"50-job multirun compile:       median {s:.2f} s  (min {min(sweeps):.2f}, max {max(sweeps):.2f}, "
          f"n={len(sweeps)}) = {s / 50 * 1000:.0f} ms per job")


if __name__ == "__main__":
    main()
