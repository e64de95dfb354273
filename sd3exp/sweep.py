"""Sweep summary: `sweep.json` + `sweep.html` in a multirun folder, one row per job.

A Hydra callback (registered in conf/config.yaml under hydra.callbacks). Each
job records itself under `<sweep dir>/.sweep/<num>.json` when it starts and
ends (with submitit these hooks run in the job's own process), then the summary
is rebuilt from those records and the run folders on disk, so it is current
after every job, also when a later job stops the sweep. A job whose process
exits before the job ends (an sd3exp error exits the process) is marked failed.
"""

from __future__ import annotations

import atexit
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sd3exp import console
from sd3exp.io import dumps_json, read_json, write_json, write_text
from sd3exp.layout import EvalLayout, RunLayout
from sd3exp.project import TEMPLATES
from sd3exp.runfolder import checkpoint_dirs

if TYPE_CHECKING:
    import jinja2

RECORDS = ".sweep"
TRIALS = f"{RECORDS}/optuna/trials.json"  # each Optuna trial's state, written by sd3exp/optuna_sweep/
TRIAL_KEY = "sweep.optuna."  # the overrides the Optuna sweeper appends: how a job reports, not what it trains
EXITED = "the job's process exited before the job ended (see its output)"
EVAL_LINKS = {"grid": f"{RunLayout.EVAL}/{EvalLayout.GRID}", "report": f"{RunLayout.EVAL}/{EvalLayout.REPORT}"}


def is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _select(config: DictConfig, key: str) -> Optional[str]:
    return OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)


def job_record(config: DictConfig, status: str, error: Optional[str] = None) -> Dict[str, Any]:
    return {"num": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task),
            "run_dir": _select(config, "hydra.runtime.output_dir"),
            "training_dir": _select(config, "paths.training_dir"), "status": status, "error": error}


def failure(job_return: JobReturn) -> Optional[str]:
    """The exception of a failed job as one line; None when it completed."""
    if job_return.status != JobStatus.FAILED:
        return None
    try:
        _ = job_return.return_value  # raises the job's exception
    except Exception as err:  # noqa: BLE001 - any job exception is reported, not handled
        return f"{type(err).__name__}: {err}"
    return None


def record_path(sweep_dir: Path, num: int) -> Path:
    return sweep_dir / RECORDS / f"{num}.json"


def read_records(sweep_dir: Path) -> List[Dict[str, Any]]:
    return sorted((read_json(p) for p in (sweep_dir / RECORDS).glob("*.json")), key=lambda r: r["num"])


def split_overrides(records: List[Dict[str, Any]]) -> tuple:
    """(swept keys: values differ between jobs, common overrides: the same in every job)."""
    values = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"] if not o.startswith(TRIAL_KEY))
              for r in records]
    keys = list(dict.fromkeys(k for v in values for k in v))
    swept = [k for k in keys if len({v.get(k) for v in values}) > 1]
    common = {k: values[0][k] for k in keys if k not in swept} if values else {}
    return swept, common, values


def disk_status(run_dir: Path, training_dir: Optional[str]) -> str:
    if any((run_dir / rel).is_file() for rel in EVAL_LINKS.values()):
        return "evaluated"
    if training_dir and checkpoint_dirs(Path(training_dir)):
        return "trained"
    return "compiled" if RunLayout(run_dir).config_env.is_file() else "planned"


def plan_figures(run_dir: Path) -> Optional[Dict[str, int]]:
    path = RunLayout(run_dir).plan
    if not path.is_file():
        return None
    plan = read_json(path)
    return {"steps_per_epoch": plan["steps_per_epoch"], "max_train_steps": plan["max_train_steps"],
            "checkpoints": len(plan["checkpoint_steps"])}


def best_thumbnail(eval_dir: Path, label: str) -> Optional[Path]:
    """The chosen checkpoint's first rendered image."""
    cells_json = EvalLayout(eval_dir).cells
    cells = read_json(cells_json) if cells_json.is_file() else []
    for cell in cells:
        if cell["label"] == label and cell["status"] == "ok" and cell["paths"]:
            path = eval_dir / cell["paths"][0]
            return path if path.is_file() else None
    return None


def trained(run_dir: Path, training_dir: Optional[str]) -> Dict[str, Any]:
    """Steps trained (the last checkpoint's) and the early stop, when training.early_stop stopped the job."""
    from sd3exp.live.state import early_stop_of

    steps = max(checkpoint_dirs(Path(training_dir)), default=0) if training_dir else 0
    return {"steps": steps, "early_stop": early_stop_of(run_dir)}


def trial_number(record: Dict[str, Any]) -> Optional[int]:
    """The Optuna trial a job ran (its `sweep.optuna.trial=N` override); None outside an Optuna sweep."""
    for override in record["overrides"]:
        if override.startswith(f"{TRIAL_KEY}trial="):
            return int(override.split("=", 1)[1])
    return None


def trial_row(record: Dict[str, Any], run_dir: Path, trials: Dict[str, Any], plan: Optional[Dict[str, int]],
              best: Optional[Dict[str, Any]], steps: int) -> Optional[Dict[str, Any]]:
    """An Optuna trial's state (complete, pruned, failed, running), the step the pruner or early stop
    stopped it at, steps trained (the trainer's last step, which may lie past the last checkpoint)
    against planned, its best checkpoint and score."""
    from sd3exp.live.state import stop_of

    number = trial_number(record)
    if number is None:
        return None
    told = trials.get("trials", {}).get(str(number), {})
    state = told.get("state") or ("failed" if record["status"] == "failed" else "running")
    stop = stop_of(run_dir)
    planned = plan["max_train_steps"] if plan else None
    complete = state == "complete" and not stop and planned is not None
    summary_path = RunLayout(run_dir).training_summary
    if summary_path.is_file():  # the trainer's last step: past the last checkpoint when it was stopped
        steps = max(steps, int((read_json(summary_path).get("progress") or {}).get("step") or 0))
    return {"number": number, "state": state, "value": told.get("value"),
            "stopped_at_step": stop["step"] if stop else None,
            "steps_trained": planned if complete else steps, "steps_planned": planned,
            "best_checkpoint": best["label"] if best else None, "best_score": best["score"] if best else None}


def steps_saved(jobs: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Steps not trained against running every trial of the sweep to its end (Optuna sweeps only)."""
    trials = [j["trial"] for j in jobs if j.get("trial") and j["trial"]["steps_planned"] is not None
              and j["trial"]["state"] != "running"]
    if not trials:
        return None
    planned = sum(t["steps_planned"] for t in trials)
    trained_ = sum(min(t["steps_trained"], t["steps_planned"]) for t in trials)
    return {"steps": planned - trained_, "planned": planned, "trained": trained_,
            "share": (planned - trained_) / planned if planned else 0.0}


def job_best(run_dir: Path, sweep_dir: Path) -> Optional[Dict[str, Any]]:
    """The job's best checkpoint, its score and a thumbnail, from eval/best.json; None when not scored."""
    path = RunLayout(run_dir).eval.best
    if not path.is_file():
        return None
    best = read_json(path)
    rule, chosen = best["rule"], best["best"]
    thumb = best_thumbnail(RunLayout(run_dir).eval.folder, chosen["label"]) if chosen else None
    return {"label": chosen["label"] if chosen else None, "step": chosen["step"] if chosen else None,
            "checkpoint": chosen["checkpoint"] if chosen else None, "objective": rule["objective"],
            "direction": rule["direction"], "score": chosen["scores"][rule["objective"]] if chosen else None,
            "rule": rule["text"], "thumbnail": os.path.relpath(thumb, sweep_dir) if thumb else None}


def ranking(jobs: List[Dict[str, Any]]) -> List[int]:
    """Job numbers, best objective first (the rule's direction; ties: the lower job number); unscored last."""
    scored = [j for j in jobs if j["best"] and j["best"]["score"] is not None]
    sign = -1.0 if scored and scored[0]["best"]["direction"] == "max" else 1.0
    ranked = sorted(scored, key=lambda j: (sign * j["best"]["score"], j["num"]))
    return [j["num"] for j in ranked] + [j["num"] for j in jobs if j not in scored]


def row(record: Dict[str, Any], values: Dict[str, str], swept: List[str], sweep_dir: Path,
        trials: Dict[str, Any]) -> Dict[str, Any]:
    run_dir = Path(record["run_dir"] or sweep_dir)
    done = record["status"] == "completed"
    plan, best, steps = plan_figures(run_dir), job_best(run_dir, sweep_dir), trained(run_dir, record["training_dir"])
    return {"num": record["num"], "run_dir": os.path.relpath(run_dir, sweep_dir),
            "values": {k: values.get(k) for k in swept},
            "status": disk_status(run_dir, record["training_dir"]) if done else record["status"],
            "error": record["error"], "plan": plan, "best": best, "trained": steps,
            "trial": trial_row(record, run_dir, trials, plan, best, steps["steps"]),
            "links": {name: os.path.relpath(run_dir / rel, sweep_dir) if (run_dir / rel).is_file() else None
                      for name, rel in EVAL_LINKS.items()}}


def summary(sweep_dir: Path) -> Dict[str, Any]:
    records = read_records(sweep_dir)
    swept, common, values = split_overrides(records)
    trials = read_json(sweep_dir / TRIALS) if (sweep_dir / TRIALS).is_file() else {}
    jobs = [row(r, v, swept, sweep_dir, trials) for r, v in zip(records, values)]
    order = ranking(jobs)
    for job in jobs:
        job["rank"] = order.index(job["num"]) + 1 if job["best"] and job["best"]["score"] is not None else None
    optuna = {k: trials[k] for k in ("study", "storage", "direction", "pruner", "n_trials") if k in trials} or None
    return {"sweep_dir": str(sweep_dir), "swept": swept, "common": common, "ranking": order,
            "jobs": sorted(jobs, key=lambda j: order.index(j["num"])), "optuna": optuna,
            "steps_saved": steps_saved(jobs)}


@functools.cache
def _template() -> jinja2.Template:
    """sweep.html.j2, loaded once per process (the local launcher runs every job in one)."""
    import jinja2  # a single run instantiates this callback too, and renders nothing

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=True, keep_trailing_newline=True)
    return env.get_template("sweep.html.j2")


def render_html(data: Dict[str, Any]) -> str:
    return _template().render(sweep=data)


def write_summary(sweep_dir: Path) -> Dict[str, Any]:
    data = summary(sweep_dir)
    write_text(sweep_dir / "sweep.json", dumps_json(data))
    write_text(sweep_dir / "sweep.html", render_html(data))
    return data


class SweepSummary(Callback):
    """Keeps `sweep.json` / `sweep.html` of a multirun folder up to date."""

    def __init__(self) -> None:
        self._running: Dict[Path, Dict[str, Any]] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        record = job_record(config, "running")
        path = record_path(Path(config.hydra.sweep.dir), record["num"])
        write_json(path, record)
        if not self._running:
            atexit.register(self._exited)
        self._running[path] = record

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        error = failure(job_return)
        record = job_record(config, "completed" if error is None else "failed", error)
        sweep_dir = Path(config.hydra.sweep.dir)
        path = record_path(sweep_dir, record["num"])
        write_json(path, record)
        if self._running.pop(path, None) is not None and not self._running:
            atexit.unregister(self._exited)
        data = write_summary(sweep_dir)
        from sd3exp.tracking import sweep_job_ended

        sweep_job_ended(config, sweep_dir, data)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sd3exp.tracking import sweep_started

        sweep_started(config, Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (sweep_dir / RECORDS).is_dir():
            data = write_summary(sweep_dir)
            console.info(f"sweep summary: {sweep_dir / 'sweep.html'} ({len(data['jobs'])} job(s))")

    def _exited(self) -> None:
        for path, record in self._running.items():
            write_json(path, {**record, "status": "failed", "error": EXITED})
            write_summary(path.parent.parent)
