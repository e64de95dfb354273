"""Whole-process time of `python -m sd3exp ... stage=compile` against a no-op Hydra 1.3 app
(benchmarks/noop_hydra_app.py), side by side in one run: one compile, and a 50-job multirun. A second
baseline, the no-op app composing sd3exp's own conf/ (benchmarks/noop_sd3exp_conf.py, its callbacks
replaced by Hydra's no-op Callback), splits the difference into Hydra composing this config tree and
sd3exp's own work. sd3exp keeps a run's composition in the user's cache (sd3exp/compose_cache.py; here a
cache in the temporary folder): "sd3exp" reads it back as a second compile of an unchanged experiment does,
"sd3exp, composed" has it removed before each run, as the first compile after an edit.

    .venv/bin/python benchmarks/bench_compile.py [--repeat 5] [--sweeps 2] [--source]

Every app runs with a bytecode cache (PYTHONPYCACHEPREFIX in the temporary folder, filled by an
untimed 2-job multirun of each), as an installed package has one, also where PYTHONDONTWRITEBYTECODE
is set; --source keeps the environment as it is (with PYTHONDONTWRITEBYTECODE=1: every module of ours
compiled from source on every run, while the installed libraries have their .pyc). Each repeat runs
the apps back to back (the order rotating), so a change of the machine's load hits all; the figures
are medians of those rounds. Goals (issue 23): one compile <= 1.3x the no-op app; a multirun
<= +30 ms per job over the no-op app's. Everything is written under a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
QUIET = [f"hydra.callbacks.{name}._target_=hydra.experimental.callback.Callback"
         for name in ("defer_run_dir", "sweep_summary")]
APPS: Dict[str, List[str]] = {  # name -> command line before the overrides
    "sd3exp": [sys.executable, "-m", "sd3exp"],
    "sd3exp, composed": [sys.executable, "-m", "sd3exp"],
    "no-op app": [sys.executable, str(HERE / "noop_hydra_app.py")],
    "no-op, sd3exp conf": [sys.executable, str(HERE / "noop_sd3exp_conf.py")],
}
EXTRA = {"no-op, sd3exp conf": QUIET}  # overrides after the others
GRID = ["optimizer.lr=range(1e-5,1.1e-4,1e-5)", "lora.rank=4,8,16,32,64"]  # 10 x 5 = 50 jobs
JOBS = 50
ENV = dict(os.environ)


def timed(app: str, overrides: List[str]) -> float:
    if app == "sd3exp, composed":
        shutil.rmtree(Path(ENV["XDG_CACHE_HOME"]) / "sd3exp" / "composed", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([*APPS[app], *overrides, *EXTRA.get(app, [])], cwd=ROOT, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def single(app: str, out: Path) -> float:
    return timed(app, ["experiment=fantasy_art", "stage=compile", f"hydra.run.dir={out}"])


def sweep(app: str, out: Path) -> float:
    seconds = timed(app, ["-m", "experiment=fantasy_art_lora", *GRID, "stage=compile", f"hydra.sweep.dir={out}"])
    marker = "config/config.env" if app == "sd3exp" else ""  # sd3exp's jobs must have compiled
    jobs = len([p for p in out.iterdir() if p.is_dir() and (p / marker).exists()])
    assert jobs == JOBS, f"expected {JOBS} job folders in {out}, found {jobs}"
    return seconds


def rounds(n: int, run, folder: Path, names: List[str]) -> Dict[str, List[float]]:
    """n rounds of the apps, the order rotating each round."""
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(run(name, folder / f"{i}-{name.replace(' ', '_').replace(',', '')}"))
    return times


def spread(xs: List[float]) -> str:
    return f"median {statistics.median(xs):7.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds of single compiles")
    parser.add_argument("--sweeps", type=int, default=2, help="rounds of 50-job multiruns")
    parser.add_argument("--source", action="store_true", help="no bytecode cache of our own")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          + ("environment as it is" if args.source else "with a bytecode cache"))
    with tempfile.TemporaryDirectory(prefix="sd3exp-bench-") as tmp:
        t = Path(tmp)
        ENV["XDG_CACHE_HOME"] = str(t / "cache")
        if not args.source:
            ENV.pop("PYTHONDONTWRITEBYTECODE", None)
            ENV["PYTHONPYCACHEPREFIX"] = str(t / "pycache")
            for app in APPS:
                timed(app, ["-m", "experiment=fantasy_art_lora", "lora.rank=4,8", "stage=compile",
                            f"hydra.sweep.dir={t / 'warm' / app.replace(' ', '_').replace(',', '')}"])
        single("sd3exp", t / "warm" / "single")  # the schema's and this run's composition in the cache
        ones = rounds(args.repeat, single, t / "single", list(APPS))
        print("one compile, experiment=fantasy_art:")
        for name, xs in ones.items():
            ratio = statistics.median([a / b for a, b in zip(xs, ones["no-op app"])])
            print(f"  {name:20} {spread(xs)}   this / no-op app: {ratio:.2f}x")
        print("  goal: sd3exp / no-op app <= 1.3x")
        many = rounds(args.sweeps, sweep, t / "sweep", [name for name in APPS if name != "sd3exp, composed"])
        print(f"{JOBS}-job multirun compile, experiment=fantasy_art_lora:")
        for name, xs in many.items() if args.sweeps else ():
            extra = statistics.median([(a - b) / JOBS * 1000 for a, b in zip(many["sd3exp"], xs)])
            print(f"  {name:20} {spread(xs)} = {statistics.median(xs) / JOBS * 1000:4.0f} ms/job   "
                  f"sd3exp - this: {extra:+.0f} ms/job")
        print("  goal: sd3exp - no-op app <= +30 ms/job")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
