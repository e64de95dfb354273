"""Pruning's saving: the shipped pruned search (hparams_search=demo_pruned) run twice on the CPU demo,
unpruned (hydra.sweeper.pruner.name=none: every trial trains to its end) and pruned (MedianPruner), in
fresh sweep folders. Prints each sweep's winner, every trial's state and steps, the steps trained and
their ratio, and the wall times; exits 1 unless the winners agree and the pruned sweep trains at least
30% fewer steps.

    .venv/bin/python benchmarks/bench_pruning.py [--trials 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sweep(folder: Path, trials: int, *extra: str) -> dict:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sd3exp", "-m", "experiment=demo", "hparams_search=demo_pruned",
                          f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={folder}", *extra],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"sweep in {folder} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    data = json.loads((folder / "sweep.json").read_text())
    data["seconds"] = time.monotonic() - start
    return data


def describe(name: str, data: dict) -> str:
    winner = data["jobs"][0]
    lines = [f"{name}: {data['seconds']:.0f} s; winner job {winner['num']} {winner['values']} "
             f"{winner['best']['objective']} {winner['best']['score']:.4f} ({winner['best']['label']})"]
    for job in sorted(data["jobs"], key=lambda j: j["num"]):
        t = job["trial"]
        stop = f" at step {t['stopped_at_step']}" if t["stopped_at_step"] is not None else ""
        lines.append(f"  trial {t['number']} {job['values']}: {t['state']}{stop}, {t['steps_trained']} of "
                     f"{t['steps_planned']} steps, best {t['best_checkpoint']} {t['best_score']}")
    saved = data["steps_saved"]
    lines.append(f"  steps trained {saved['trained']} of {saved['planned']} planned")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="leave both sweep folders here")
    a = parser.parse_args()
    base = a.keep or Path(tempfile.mkdtemp(prefix="sd3exp-bench-pruning-"))
    try:
        unpruned = sweep(base / "unpruned", a.trials, "hydra.sweeper.pruner.name=none")
        pruned = sweep(base / "pruned", a.trials)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(describe("unpruned", unpruned))
    print(describe("pruned", pruned))
    same = unpruned["jobs"][0]["values"] == pruned["jobs"][0]["values"]
    ratio = pruned["steps_saved"]["trained"] / unpruned["steps_saved"]["trained"]
    print(f"same winner: {same}; steps trained pruned/unpruned: {pruned['steps_saved']['trained']}/"
          f"{unpruned['steps_saved']['trained']} = {ratio:.2f} ({100 * (1 - ratio):.0f}% fewer); "
          f"wall time {pruned['seconds']:.0f} s / {unpruned['seconds']:.0f} s")
    return 0 if same and ratio <= 0.7 else 1


if __name__ == "__main__":
    sys.exit(main())
