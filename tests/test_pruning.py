"""The shipped pruned search (hparams_search=demo_pruned) on real SimpleTuner runs of the tiny SD3, on
the CPU, through the CLI, at its smallest size that shows a prune: 2 trials (learning rate 1e-5,
which completes, then 3e-4, which the MedianPruner stops). The sweep's own process is SIGKILLed while the
second trial runs and the same command is run again: the study continues (sd3exp/optuna_sweep/)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sd3exp.project import ROOT
from sd3exp.runfolder import checkpoint_dirs
from sd3exp.train import stop_run
from tests.helpers import needs_trainer, run_cli

pytestmark = [needs_trainer, pytest.mark.slow, pytest.mark.timeout(2400)]  # about 5 min on 2 idle cores


# The shipped 300 steps cut for CI; checkpoints stay 50 apart: on 2 cores evaluating a checkpoint takes
# about as long as training 50 steps, so the pruned trainer stops well before its last step
SMALLER = ["training.max_steps=200"]


def args(sweep: Path) -> list:
    return ["-m", "experiment=demo", "hparams_search=demo_pruned", "hydra.sweeper.n_trials=2", *SMALLER,
            f"hydra.sweep.dir={sweep}"]


def trials_json(sweep: Path) -> dict:
    try:
        return json.loads((sweep / ".sweep" / "optuna" / "trials.json").read_text())["trials"]
    except (OSError, ValueError, KeyError):
        return {}


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory):
    """The search started in the background, SIGKILLed once trial 0 has finished and job 1 has started,
    the trainer it left stopped (as its message tells a user), then the same command run to its end."""
    sweep = tmp_path_factory.mktemp("pruned") / "sweep"
    sweep.parent.mkdir(exist_ok=True)
    with open(f"{sweep}.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", *args(sweep)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 1200
    while not (trials_json(sweep).get("0", {}).get("state") in ("complete", "pruned")
               and (sweep / ".sweep" / "1.json").is_file()):
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) first: " + Path(f"{sweep}.out").read_text()[-3000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)
    before = trials_json(sweep)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for run in sweep.glob("[0-9]*_demo"):
        stop_run(run, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    again = run_cli(*args(sweep), timeout=2000)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return sweep, before, again.stdout + again.stderr


def test_a_trial_is_pruned_before_its_last_checkpoint_and_keeps_its_scores(pruned_sweep):
    sweep, _, _ = pruned_sweep
    data = json.loads((sweep / "sweep.json").read_text())
    trials = {j["trial"]["number"]: j for j in data["jobs"]}
    assert [trials[n]["trial"]["state"] for n in (0, 1)] == ["complete", "pruned"], json.dumps(data, indent=1)[-3000:]
    pruned = trials[1]
    run = sweep / pruned["run_dir"]
    planned = json.loads((run / "plan.json").read_text())["checkpoint_steps"]
    stop = pruned["trial"]["stopped_at_step"]
    steps = sorted(checkpoint_dirs(run / "training"))
    assert stop in steps and stop < planned[-1] and steps[-1] < planned[-1]
    trained = pruned["trial"]["steps_trained"]  # the trainer's last step: at or past its last checkpoint
    assert steps[-1] <= trained < pruned["trial"]["steps_planned"] == 200
    live = json.loads((run / "live.json").read_text())
    assert live["pruned"]["step"] == stop and "MedianPruner" in live["pruned"]["reason"]
    cells = json.loads((run / "eval" / "cells.json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    scored = {c["step"] for c in cells if c["status"] == "ok" and c["scores"].get("pixel_fidelity") is not None}
    assert stop in scored and scored <= set(steps)
    assert pruned["best"]["score"] is not None and pruned["trial"]["best_score"] == pruned["best"]["score"]
    # the winner: the completed trial, named in sweep.json, sweep.html and optimization_results.yaml
    assert data["ranking"][0] == trials[0]["num"] and trials[0]["trial"]["steps_trained"] == 200
    assert f"Winner: job {trials[0]['num']}" in (sweep / "sweep.html").read_text()
    assert "optimizer.lr: 1.0e-05" in (sweep / "optimization_results.yaml").read_text()
    saved = data["steps_saved"]
    assert saved["planned"] == 400 and saved["steps"] == 200 - trained and saved["share"] > 0


def test_the_study_in_the_storage_has_the_states_and_intermediate_values(pruned_sweep):
    sweep, _, _ = pruned_sweep
    study = optuna.load_study(study_name="demo_pruned", storage=f"sqlite:///{sweep / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    first, second = study.trials
    assert sorted(first.intermediate_values) == [50, 100, 150, 200]
    assert max(second.intermediate_values) == second.user_attrs["sd3exp_pruned"]["step"]
    assert second.params == {"optimizer.lr": 3e-4}


def test_a_sigkilled_sweep_continues_its_study_when_run_again(pruned_sweep):
    sweep, before, out = pruned_sweep
    assert before["0"]["state"] == "complete" and before["1"]["state"] == "running"
    assert "continuing the study: 1 trial(s) finished, 1 left running" in out
    after = trials_json(sweep)
    assert set(after) == {"0", "1"}  # trial 1 resumed under its own number, no new trial
    assert after["0"]["value"] == before["0"]["value"]
    assert after["1"]["state"] == "pruned"
