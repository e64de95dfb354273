"""Scoring's cost relative to the evaluation: `stage=eval` of one trained run with scoring off and on
(each on a fresh copy of the run, so every cell is rendered and scored), wall time side by side; and,
less exposed to a busy machine, the scoring step alone (score every cell again, choose, plot, write
best.json) timed in-process, plus the import of numpy + matplotlib, against the evaluation's time.

    .venv/bin/python benchmarks/bench_scoring.py RUN_FOLDER [--repeats N] [--clip DIR] [--dino DIR] [-- OVERRIDES]

RUN_FOLDER: a trained run (e.g. outputs/demo after `make demo`); OVERRIDES: what it was trained
with beyond the experiment (e.g. experiment=demo, the default).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent


def fresh_copy(run: Path, dest: Path) -> Path:
    """A copy of the run without its evaluation."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval", "eval.previous-*", ".sd3exp-lock*"))
    marker = dest / "training" / ".sd3exp-run"
    if marker.is_file():
        marker.write_text(f"{dest.resolve()}\n")
    return dest


def timed_eval(run: Path, overrides: List[str]) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "sd3exp", *overrides, "stage=eval", f"hydra.run.dir={run}"], cwd=ROOT,
                   check=True, capture_output=True)
    return time.monotonic() - start


def scoring_seconds(run: Path, overrides: List[str]) -> float:
    """choose_best on the run's evaluated cells, every score computed again."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sd3exp.evaluate.cells import read_cells_json
    from sd3exp.evaluate.score import choose_best
    from sd3exp.io import read_json
    from sd3exp.job import absolute_paths
    from sd3exp.project import CONF_DIR, register

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = absolute_paths(OmegaConf.to_object(compose("config", overrides=overrides + ["name=bench", f"paths.run_dir={run}"])))
    cells = [replace(c, scored_with="") for c in read_cells_json(run / "eval" / "cells.json")]
    start = time.monotonic()
    choose_best(cfg, run, cells, read_json(run / "eval" / "request.json"))
    return time.monotonic() - start


def import_seconds() -> float:
    code = "import time; t = time.monotonic(); import sd3exp.evaluate.score, sd3exp.plots; print(time.monotonic() - t)"
    return float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip", default=None)
    parser.add_argument("--dino", default=None)
    parser.add_argument("overrides", nargs="*", default=["experiment=demo"])
    args = parser.parse_intermixed_args()
    models = [f"eval.scoring.{k}={v}" for k, v in (("clip", args.clip), ("dino", args.dino)) if v]
    modes = {"scoring off": ["eval.scoring.enabled=false"], "scoring on": models}
    times = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="sd3exp-bench-scoring-") as tmp:
        for i in range(args.repeats):
            for name, extra in modes.items():
                run = fresh_copy(args.run.resolve(), Path(tmp) / f"{i}-{name.replace(' ', '-')}")
                times[name].append(timed_eval(run, args.overrides + extra))
        scored = Path(tmp) / f"{args.repeats - 1}-scoring-on"
        step = statistics.median(scoring_seconds(scored, args.overrides + models) for _ in range(args.repeats))
    imports = statistics.median(import_seconds() for _ in range(args.repeats))
    off, on = (statistics.median(times[n]) for n in modes)
    for name, values in times.items():
        print(f"{name:<12} median {statistics.median(values):7.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"scoring adds {on - off:+.2f} s = {100 * (on - off) / off:+.1f}% of the evaluation "
          f"({'with ' + ', '.join(models) if models else 'weight-free measures'})")
    print(f"scoring step alone {step:.2f} s + imports {imports:.2f} s = {100 * (step + imports) / off:.1f}% "
          f"of the evaluation without scoring ({off:.2f} s)")


if __name__ == "__main__":
    main()
