"""Sweeps on a real one-node Slurm (tests/slurm/cluster.sh, started by .ci/run): jobs submitted through
`hydra/launcher=slurm_gpu`, a failing trial, a preempted trial, a cache shared by the trials."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List, Optional

import pytest

from sd3exp.project import ROOT
from sd3exp.runfolder import checkpoint_dirs
from sd3exp.train import run_processes
from tests.helpers import needs_trainer, run_cli

CLUSTER = Path(__file__).resolve().parent / "slurm" / "cluster.sh"


def slurm_conf() -> Optional[str]:
    conf = os.environ.get("SLURM_CONF")
    return conf if conf and Path(conf).is_file() and shutil.which("sbatch") else None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    slurm_conf() is None and os.environ.get("CI") != "true",
    reason=f"no one-node Slurm: run `{CLUSTER} start` and `eval \"$({CLUSTER} env)\"` first")]

# The cluster's node has no GPU and few CPUs: the launcher's GPU settings overridden for it.
CPU_LAUNCHER = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=30"]
# A small trial whatever conf/experiment/demo.yaml says: 4 LoRA steps, a checkpoint every 2, one 64 px cell.
SMALL = ["model.type=lora", "training.epochs=0", "training.max_steps=4", "checkpointing.every_steps=2",
         "checkpointing.keep=0", "dataset.resolution=64", "eval.prompts=[k4s4 red circle]", "eval.seeds=[0]",
         "eval.steps=2", "eval.width=64", "eval.height=64"]


def slurm(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=60).stdout


def sweep(sweep_dir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """A demo sweep on the cluster; its caches in `<sweep_dir>/cache` (not the project's outputs/)."""
    return run_cli("-m", "experiment=demo", *CPU_LAUNCHER, *args, f"hydra.sweep.dir={sweep_dir}",
                   f"dataset.cache_dir={sweep_dir}/cache", timeout=timeout)


def jobs_of(sweep_dir: Path) -> List[dict]:
    """The sweep's jobs in launch order (sweep.json lists them best first once they are scored)."""
    return sorted(json.loads((sweep_dir / "sweep.json").read_text())["jobs"], key=lambda j: j["num"])


def queue() -> str:
    return slurm("squeue", "-h", "-o", "%i %T").strip()


def test_the_cluster_has_one_idle_node_sized_to_the_machine():
    state, cpus, memory = slurm("sinfo", "-h", "-N", "-o", "%t %c %m").split()
    total_mb = int(subprocess.run(["free", "-m"], capture_output=True, text=True).stdout.split()[7])
    assert state == "idle" and int(cpus) == os.cpu_count() and 0 < int(memory) < total_mb


def test_a_batch_job_runs_and_accounting_reports_it(tmp_path):
    """submitit polls job states with sacct: accounting must answer."""
    out = slurm("sbatch", "--parsable", "--wait", f"--output={tmp_path}/job.out", "--wrap=echo ran on $(hostname)")
    job = out.strip().split(";")[0]
    assert (tmp_path / "job.out").read_text().startswith("ran on ")
    states = slurm("sacct", "-n", "-X", "-P", "-o", "State", "-j", job).split()
    assert states == ["COMPLETED"]


def test_a_failing_trial_is_reported_and_the_other_still_runs(tmp_path):
    out = sweep(tmp_path, "model.type=lora", "lora.rank=4,0", "stage=compile", timeout=300)
    assert out.returncode != 0
    jobs = jobs_of(tmp_path)
    assert [j["status"] for j in jobs] == ["compiled", "failed"]
    assert "lora.rank" in jobs[1]["error"]
    assert len(list((tmp_path / ".submitit").glob("*_[01]"))) == 2  # two Slurm array tasks
    queue_drains()


def test_other_resolutions_get_other_caches(tmp_path):
    out = sweep(tmp_path, "dataset.resolution=64,128", "stage=compile", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    caches = [json.loads((tmp_path / j["run_dir"] / "plan.json").read_text())["cache_dir"] for j in jobs_of(tmp_path)]
    assert len(set(caches)) == 2 and all(Path(c).parent == tmp_path / "cache" for c in caches)
    for job, cache in zip(jobs_of(tmp_path), caches):
        backends = json.loads((tmp_path / job["run_dir"] / "config" / "multibackend.json").read_text())
        assert [b.get("cache_dir_vae", b.get("cache_dir")) for b in backends] == [f"{cache}/vae/shapes", f"{cache}/text"]


@pytest.fixture(scope="module")
def two_trials(tmp_path_factory):
    """The issue's sweep: two LoRA ranks, trained and evaluated, one Slurm job each, started at once."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    out = sweep(sweep_dir, "lora.rank=2,4", "stage=all", *SMALL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sweep_dir, out


@needs_trainer
def test_a_two_trial_sweep_trains_and_evaluates_each_trial(two_trials):
    tmp_path, out = two_trials
    queue_drains()
    jobs = jobs_of(tmp_path)
    assert [j["values"] for j in jobs] == [{"lora.rank": "2"}, {"lora.rank": "4"}]
    for job in jobs:
        run = tmp_path / job["run_dir"]
        plan = json.loads((run / "plan.json").read_text())
        assert job["status"] == "evaluated" and job["links"]["grid"] and (run / "eval" / "grid.png").is_file()
        assert sorted(checkpoint_dirs(run / "training")) == plan["checkpoint_steps"] == [2, 4]
        assert f"--lora_rank={job['values']['lora.rank']}" in (run / "config" / "config.env").read_text()
    assert "sweep summary:" in out.stdout


def queue_drains(timeout: float = 60) -> None:
    """squeue empties: a job whose result submitit has read may still be tearing down (RUNNING) a moment."""
    wait_for(lambda: queue() == "", timeout, f"an empty queue (squeue: {queue()!r})")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def start_requeued(job: str) -> None:
    """Once submitit has requeued `job` (PENDING), start it now rather than 2 minutes later (Slurm's
    delay for a requeued job), but only after its first run has ended and a second has passed: a job
    started within the second its credential was revoked is killed ("Job credential revoked")."""
    wait_for(lambda: "PENDING" in queue(), 120, "the job to be requeued")
    wait_for(lambda: slurm("sinfo", "-h", "-N", "-o", "%t").strip() == "idle", 180,
             f"the node to be idle (when the wait began: {slurm('sinfo', '-h', '-N', '-o', '%t %E').strip()!r})")
    time.sleep(2)
    slurm("scontrol", "update", f"JobId={job}", "StartTime=now")


def saved(training: Path) -> List[int]:
    """Steps of the checkpoints whose save finished (SimpleTuner writes `.guard` last)."""
    return [s for s, p in checkpoint_dirs(training).items() if (p / ".guard").is_file()]


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_trainer
def test_a_preempted_trial_is_requeued_and_resumes_from_its_latest_checkpoint(tmp_path):
    """Slurm's preemption / time-limit signal (USR2, as `--signal=USR2@...` sends it) through scancel:
    submitit checkpoints the Hydra job and requeues it; the rerun resumes SimpleTuner."""
    args = ["-m", "experiment=demo", *CPU_LAUNCHER, "lora.rank=2", "stage=train", *SMALL,
            "training.max_steps=8", f"hydra.sweep.dir={tmp_path}", f"dataset.cache_dir={tmp_path}/cache"]
    sweep_cmd = subprocess.Popen([sys.executable, "-m", "sd3exp", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    training, job = tmp_path / "0_demo" / "training", None
    try:
        wait_for(lambda: saved(training), 600, "the first checkpoint")
        first = {s: files_of(training / f"checkpoint-{s}") for s in saved(training)}
        job = queue().split()[0]
        slurm("scancel", "--signal=USR2", job)
        start_requeued(job)
        output, _ = sweep_cmd.communicate(timeout=900)
    finally:
        sweep_cmd.kill()
        if job:  # a failed test leaves nothing queued (a no-op once the job is done)
            subprocess.run(["scancel", job], check=False, capture_output=True)
    assert sweep_cmd.returncode == 0, output[-3000:]
    queue_drains()
    plan = json.loads((tmp_path / "0_demo" / "plan.json").read_text())
    assert sorted(checkpoint_dirs(training)) == plan["checkpoint_steps"] == [2, 4, 6, 8]
    for step, files in first.items():  # the checkpoints saved before the preemption are untouched
        assert files_of(training / f"checkpoint-{step}") == files
    log = "".join(p.read_text() for p in sorted((tmp_path / ".submitit").glob("*/*_log.*")))
    assert "Requeued job" in log
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint-(\d+)", log)]
    assert resumed and resumed[0] >= max(first)
    summary = json.loads((tmp_path / "0_demo" / "training_summary.json").read_text())
    assert summary["start_step"] == resumed[0] and summary["progress"]["step"] == 8


def latents_computed(train_log: str) -> int:
    return sum(int(n) for n in re.findall(r"VAECache has (\d+) unprocessed files", train_log))


@needs_trainer
def test_the_trials_share_one_cache_filled_once(two_trials):
    sweep_dir, _ = two_trials
    runs = [sweep_dir / j["run_dir"] for j in jobs_of(sweep_dir)]
    caches = {json.loads((r / "plan.json").read_text())["cache_dir"] for r in runs}
    assert len(caches) == 1 and [p.name for p in (sweep_dir / "cache").iterdir()] == [Path(*caches).name]
    logs = [(r / "train.log").read_text(errors="replace") for r in runs]
    images = len(list((runs[0] / "dataset" / "shapes").glob("*.png")))
    # one trial computed every latent and text embed ("Processing prompts" is SimpleTuner's embed bar),
    # the other, started at the same time, waited for it and computed none
    assert sorted((latents_computed(log), "Processing prompts" in log) for log in logs) == [(0, False), (images, True)]
    cache = Path(*caches)
    assert len(list((cache / "vae" / "shapes").glob("*.pt"))) == images  # one trial's latents, flat
    captions = {p.read_text() for p in (runs[0] / "dataset" / "shapes").glob("*.txt")}
    assert len(list((cache / "text").glob("*.pt"))) == len(captions)
    assert any("waiting for another sd3exp job is filling the shared cache" in p.read_text()
               for p in (sweep_dir / ".submitit").glob("*/*_log.out"))


@pytest.fixture(scope="module")
def optuna_storage() -> str:
    """The cluster's Optuna database (`cluster.sh optuna-db`): a MariaDB URL with a password."""
    folder = Path(os.environ["SLURM_CONF"]).parent
    return slurm(str(CLUSTER), "optuna-db", str(folder)).strip()


def intermediate_steps(storage: str, study: str, number: int) -> List[int]:
    import optuna

    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    except KeyError:  # the sweep has not created the study yet
        return []
    return sorted(trials[number].intermediate_values) if len(trials) > number else []


def hold_until_judged(run: Path, storage: str, study: str, proc: subprocess.Popen) -> bool:
    """Trial 1's trainer paused (SIGSTOP) from its first checkpoint until its score is in the study and,
    where Optuna's MedianPruner (demo_pruned's: n_startup_trials=1) prunes on that score, the job's
    decision too: a trainer slower than the evaluation, as on a GPU, not a race with the CPU's load.
    Returns whether the pruner prunes: an lr far too large scored above trial 0 as often as below on
    the CPU's tiny model (83.92 against 82.33 once), and the test waited 600 s for a prune that was
    rightly never made."""
    import optuna

    def trial(number: int) -> optuna.trial.FrozenTrial:
        return optuna.load_study(study_name=study, storage=storage).trials[number]

    def reported() -> bool:
        trials = optuna.load_study(study_name=study, storage=storage).trials
        return len(trials) > 1 and bool(trials[1].intermediate_values)

    wait_for(lambda: ((run / "training" / "checkpoint-4").is_dir() and bool(run_processes(run)))
             or proc.poll() is not None, 900, "trial 1's first checkpoint")
    paused = run_processes(run)
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: reported() or proc.poll() is not None, 600, "trial 1's first score in the study")
        loaded = optuna.load_study(study_name=study, storage=storage)
        prunes = optuna.pruners.MedianPruner(n_startup_trials=1).prune(loaded, trial(1))
        if prunes:
            wait_for(lambda: "sd3exp_pruned" in trial(1).user_attrs or proc.poll() is not None, 600,
                     "the pruner's decision on trial 1")
        return prunes
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@needs_trainer
def test_a_pruned_search_shares_a_mariadb_study_and_a_preempted_trial_reports_to_the_same_trial(tmp_path, optuna_storage):
    """The pruned search (hparams_search=demo_pruned) through Slurm with its study in the cluster's MariaDB:
    trial 0 (lr 1e-5) is preempted (USR2) once it has reported its first checkpoint, requeued by
    submitit, resumes from its checkpoint and goes on reporting to trial 0; trial 1 (an lr far too
    large) is pruned only at a checkpoint where its best score so far is below trial 0's, once trial 0 has
    completed (the MedianPruner's rule with one completed trial; on the CPU's tiny model it may not be), and
    keeps its checkpoints and scores. The storage's
    password is in no file of the sweep folder and in no output."""
    import optuna
    from sqlalchemy.engine import make_url

    password = make_url(optuna_storage).password
    assert password and len(password) >= 12
    study_name = f"slurm_pruned_{uuid.uuid4().hex[:12]}"  # one database for every test run: a study of its own
    # 20 steps of 8 micro-batches (repeats 8: enough samples for one): trial 0 still trains when its
    # first checkpoint's score reaches the study (a LoRA step alone is faster than an evaluation)
    args = ["-m", "experiment=demo", "hparams_search=demo_pruned", *CPU_LAUNCHER, *SMALL,
            "training.max_steps=20", "checkpointing.every_steps=4", "training.gradient_accumulation=8", "concepts.0.repeats=8",
            "optimizer.lr=choice(1.0e-5, 2.0e-1)",
            "hydra.sweeper.n_trials=2", f"hydra.sweeper.study_name={study_name}",
            f"hydra.sweeper.storage='{optuna_storage}'", f"hydra.sweep.dir={tmp_path}",
            f"dataset.cache_dir={tmp_path}/cache"]
    with open(tmp_path.parent / f"{tmp_path.name}.out", "w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        job, prunes = None, True
        try:
            wait_for(lambda: intermediate_steps(optuna_storage, study_name, 0) or proc.poll() is not None, 600,
                     "trial 0's first reported checkpoint")
            before = intermediate_steps(optuna_storage, study_name, 0)
            job = queue().split()[0]
            slurm("scancel", "--signal=USR2", job)
            start_requeued(job)
            prunes = hold_until_judged(tmp_path / "1_demo", optuna_storage, study_name, proc)
            proc.wait(timeout=900)
        finally:
            proc.kill()
            if job:
                subprocess.run(["scancel", job], check=False, capture_output=True)
        out.seek(0)
        output = out.read()
    assert proc.returncode == 0, output[-3000:]
    queue_drains()
    # one study, two trials: trial 0 reported before and after its preemption, no trial was added
    study = optuna.load_study(study_name=study_name, storage=optuna_storage)
    first, second = study.trials
    # the MedianPruner's rule with one completed trial: trial 1 is pruned at a step where its best score so far is
    # below trial 0's score at that step, once trial 0 has completed (n_startup_trials=1; the trials run side by
    # side, so when that is depends on the cluster). Its first score was judged by Optuna's own pruner on the
    # study as the job saw it (hold_until_judged)
    scores = second.intermediate_values
    below = [n for n in sorted(scores) if max(v for m, v in scores.items() if m <= n) < first.intermediate_values[n]]
    stop = second.user_attrs.get("sd3exp_pruned", {}).get("step")
    assert stop is None or stop in below, (stop, below)
    assert not prunes or stop == min(second.intermediate_values), (prunes, stop)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE
                                               if stop is None else optuna.trial.TrialState.PRUNED]
    assert before and max(before) < 20 and set(before) < set(first.intermediate_values)
    assert sorted(first.intermediate_values) == [4, 8, 12, 16, 20]
    log = "".join(p.read_text() for p in sorted((tmp_path / ".submitit").glob("*/*_log.*")))
    assert "Requeued job" in log
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint-(\d+)", log)]
    assert resumed and resumed[0] >= max(before)
    summary = json.loads((tmp_path / "0_demo" / "training_summary.json").read_text())
    assert summary["start_step"] == resumed[0] > 0 and summary["progress"]["step"] == 20
    jobs = {j["trial"]["number"]: j for j in json.loads((tmp_path / "sweep.json").read_text())["jobs"]}
    assert second.params == {"optimizer.lr": 0.2}
    assert [jobs[n]["trial"]["state"] for n in (0, 1)] == ["complete", "complete" if stop is None else "pruned"]
    if stop is not None:  # trial 1: pruned at that checkpoint, its checkpoints and scores kept
        assert max(second.intermediate_values) == stop < 20
        run = tmp_path / jobs[1]["run_dir"]
        assert stop in checkpoint_dirs(run / "training") and jobs[1]["trial"]["best_score"] is not None
        cells = json.loads((run / "eval" / "cells.json").read_text())
        cells = cells["cells"] if isinstance(cells, dict) else cells
        assert stop in {c["step"] for c in cells if c["status"] == "ok" and c["scores"].get("pixel_fidelity") is not None}
    else:
        assert sorted(second.intermediate_values) == [4, 8, 12, 16, 20]
    # the password: in no output and no file of the sweep folder (Hydra's configs and submitit's pickles included)
    assert password not in output and "optuna:***@127.0.0.1" in output
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert not leaks and json.loads((tmp_path / "sweep.json").read_text())["optuna"]["storage"].startswith("mysql+pymysql://optuna:***@")
