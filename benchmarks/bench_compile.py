"""Whole-process time of `python -m sd3exp ... stage=compile` against a no-op Hydra 1.3 app
(benchmarks/noop_hydra_app.py), side by side in one run: one compile, and a 50-job multirun.

    .venv/bin/python benchmarks/bench_compile.py [--repeat 5] [--sweeps 2] [--source]

Both apps run with a bytecode cache (PYTHONPYCACHEPREFIX in the temporary folder, filled by an untimed
2-job multirun of each), as an installed package has one, also where PYTHONDONTWRITEBYTECODE is set;
--source keeps the environment as it is (with PYTHONDONTWRITEBYTECODE=1: every module of ours
compiled from source on every run, while the installed libraries have their .pyc). Each repeat
runs sd3exp and the no-op app back to back (the order alternating), so a change of the machine's
load hits both; the figures are medians of those pairs. Goals (issue 23): one compile
<= 1.3x the no-op app; a multirun <= +30 ms per job over the no-op app's. Everything is written
under a temporary folder (hydra.run.dir / hydra.sweep.dir).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
SD3EXP = [sys.executable, "-m", "sd3exp"]
NOOP = [sys.executable, str(Path(__file__).resolve().parent / "noop_hydra_app.py")]
GRID = ["optimizer.lr=range(1e-5,1.1e-4,1e-5)", "lora.rank=4,8,16,32,64"]  # 10 x 5 = 50 jobs
JOBS = 50


ENV = dict(os.environ)


def timed(command: List[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def single(app: List[str], out: Path) -> float:
    return timed([*app, "experiment=fantasy_art", "stage=compile", f"hydra.run.dir={out}"])


def sweep(app: List[str], out: Path, experiment: str) -> float:
    seconds = timed([*app, "-m", f"experiment={experiment}", *GRID, "stage=compile", f"hydra.sweep.dir={out}"])
    marker = ".hydra" if app is NOOP else "config/config.env"  # what each job leaves in its folder
    jobs = len([p for p in out.iterdir() if (p / marker).exists()])
    assert jobs == JOBS, f"expected {JOBS} job folders with {marker} in {out}, found {jobs}"
    return seconds


def paired(n: int, ours, theirs) -> Tuple[List[float], List[float]]:
    """n pairs (ours(i), theirs(i)), the order alternating."""
    a, b = [], []
    for i in range(n):
        if i % 2:
            b.append(theirs(i))
            a.append(ours(i))
        else:
            a.append(ours(i))
            b.append(theirs(i))
    return a, b


def spread(xs: List[float]) -> str:
    return f"median {statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="pairs of single compiles")
    parser.add_argument("--sweeps", type=int, default=2, help="pairs of 50-job multiruns")
    parser.add_argument("--source", action="store_true", help="no bytecode cache of our own")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          + ("environment as it is" if args.source else "with a bytecode cache"))
    with tempfile.TemporaryDirectory(prefix="sd3exp-bench-") as tmp:
        t = Path(tmp)
        if not args.source:
            ENV.pop("PYTHONDONTWRITEBYTECODE", None)
            ENV["PYTHONPYCACHEPREFIX"] = str(t / "pycache")
            for app in (SD3EXP, NOOP):
                timed([*app, "-m", "experiment=fantasy_art_lora", "lora.rank=4,8", "stage=compile",
                       f"hydra.sweep.dir={t / 'warm' / str(len(app))}"])
        ours, noop = paired(args.repeat, lambda i: single(SD3EXP, t / f"single{i}"),
                            lambda i: single(NOOP, t / f"noop{i}"))
        ratios = [a / b for a, b in zip(ours, noop)]
        print(f"compile (fantasy_art):   {spread(ours)}")
        print(f"no-op Hydra app:         {spread(noop)}")
        print(f"  ratio, median of pairs: {statistics.median(ratios):.2f}x   (goal <= 1.3x)")
        s_ours, s_noop = paired(args.sweeps, lambda i: sweep(SD3EXP, t / f"sweep{i}", "fantasy_art_lora"),
                                lambda i: sweep(NOOP, t / f"noopsweep{i}", "fantasy_art_lora"))
        extra = [(a - b) / JOBS * 1000 for a, b in zip(s_ours, s_noop)]
        print(f"50-job multirun compile: {spread(s_ours)} = {statistics.median(s_ours) / JOBS * 1000:.0f} ms/job")
        print(f"no-op app multirun:      {spread(s_noop)} = {statistics.median(s_noop) / JOBS * 1000:.0f} ms/job")
        print(f"  extra per job, median of pairs: {statistics.median(extra):+.0f} ms/job   (goal <= +30 ms/job); "
              f"ratio {statistics.median([a / b for a, b in zip(s_ours, s_noop)]):.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
