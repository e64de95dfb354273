"""Live evaluation and early stopping on real SimpleTuner runs of the tiny SD3, on the CPU, through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from sd3exp.project import ROOT
from sd3exp.runfolder import checkpoint_dirs
from sd3exp.train import run_processes
from tests.helpers import needs_trainer, run_cli

pytestmark = [needs_trainer, pytest.mark.slow, pytest.mark.timeout(2400)]  # shared runs: several minutes on 2 busy cores


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cells_labels(run: Path) -> set:
    try:
        cells = json.loads((run / "eval" / "cells.json").read_text())
    except (OSError, ValueError):
        return set()
    return {c["label"] for c in (cells["cells"] if isinstance(cells, dict) else cells)}


def wait_for(what, proc: subprocess.Popen, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"sd3exp exited ({proc.returncode}) first"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def pause_trainer(run: Path, sig: int) -> List[int]:
    """SIGSTOP/SIGCONT to every trainer process of the run: a trainer slower than the evaluation (as
    on a GPU, where thousands of steps lie between checkpoints) without training for minutes on a CPU."""
    pids = run_processes(run)
    for pid in pids:
        os.kill(pid, sig)
    return pids


def start(run: Path, *args: str) -> subprocess.Popen:
    """`python -m sd3exp ARGS` in the background, its output in <run>.out."""
    cmd = [sys.executable, "-m", "sd3exp", *args, f"hydra.run.dir={run}"]
    with open(f"{run}.out", "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, run: Path) -> str:
    proc.wait(timeout=1800)
    out = Path(f"{run}.out").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """demo_quick (checkpoints 2, 4, 6) trained with eval.live=true, watched from outside: at
    checkpoint 2 and then 4 the trainer is paused until cells.json holds that checkpoint; the
    versions of cells.json and best.json seen while the trainer's processes were alive."""
    run = tmp_path_factory.mktemp("live") / "run"
    proc = start(run, "experiment=demo_quick", "stage=train", "eval.live=true")
    seen: dict = {"cells": [], "best": []}
    for step in (2, 4):
        wait_for(lambda step=step: (run / "training" / f"checkpoint-{step}").is_dir() and run_processes(run), proc)
        paused = pause_trainer(run, signal.SIGSTOP)
        try:
            wait_for(lambda step=step: f"checkpoint-{step}" in cells_labels(run), proc)
            assert run_processes(run) and all(pid in run_processes(run) for pid in paused)
            for name in seen:
                seen[name].append(digest(run / "eval" / f"{name}.json"))
        finally:
            pause_trainer(run, signal.SIGCONT)
    return run, finished(proc, run), seen


def test_cells_and_best_change_while_the_trainer_runs(live_run):
    run, out, seen = live_run
    assert None not in seen["cells"] + seen["best"], out[-3000:]
    assert len(set(seen["cells"])) == 2 and len(set(seen["best"])) == 2, out[-3000:]


def test_every_checkpoint_is_evaluated_and_the_report_no_longer_reloads(live_run):
    run, out, _ = live_run
    cells = json.loads((run / "eval" / "cells.json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    labels = set(c["label"] for c in cells)
    assert labels == {f"checkpoint-{s}" for s in checkpoint_dirs(run / "training")}
    assert all(c["status"] == "ok" for c in cells)
    assert "refresh" not in (run / "eval" / "report.html").read_text()
    assert (run / "eval" / "scores.png").is_file()


def test_final_state_equals_a_post_hoc_eval(live_run):
    run, _, _ = live_run
    before = snapshot(run / "eval")
    out = run_cli("experiment=demo_quick", "stage=eval", "eval.include_final=false", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "already evaluated with these settings" in out.stdout
    assert snapshot(run / "eval") == before


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory):
    """A run that cannot improve (learning rate 1e-12: every checkpoint renders as the first), early
    stopping on with patience 1; the trainer is paused at checkpoint 4 until the stop is decided."""
    run = tmp_path_factory.mktemp("stall") / "run"
    args = ["experiment=demo_quick", "stage=train", "optimizer.lr=1e-12", "training.epochs=0",
            "training.max_steps=40", "checkpointing.keep=100", "training.early_stop.patience=1"]
    proc = start(run, *args)
    wait_for(lambda: (run / "training" / "checkpoint-4").is_dir() and run_processes(run), proc)
    pause_trainer(run, signal.SIGSTOP)
    try:
        wait_for(lambda: (run / "live.json").is_file()
                 and json.loads((run / "live.json").read_text())["early_stop"], proc)
    finally:
        pause_trainer(run, signal.SIGCONT)
    return run, args + [f"hydra.run.dir={run}"], finished(proc, run)


def test_a_stalled_run_stops_early_and_keeps_every_checkpoint(stalled_run):
    run, _, out = stalled_run
    steps = sorted(checkpoint_dirs(run / "training"))
    live = json.loads((run / "live.json").read_text())
    stop = live["early_stop"]
    assert stop and stop["step"] < 40 and steps[-1] < 40
    assert steps == [2 * i for i in range(1, len(steps) + 1)]  # none deleted
    assert "stopped early at step" in out and "no improvement" in out
    best = json.loads((run / "eval" / "best.json").read_text())
    assert best["best"]["label"] == "checkpoint-2"  # ties go to the earlier step


def test_a_resumed_early_stopped_run_does_not_train_on(stalled_run):
    run, args, _ = stalled_run
    before = snapshot(run / "training")
    out = run_cli(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "training stopped early at step" in out.stdout and "nothing to do" in out.stdout
    assert snapshot(run / "training") == before
