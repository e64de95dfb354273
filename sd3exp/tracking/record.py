"""What a run gives its trackers, read from the run folder: params, tags, metrics by step, artifacts,
images by step. No tracker is imported here."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sd3exp.evaluate.checkpoints import BASE_LABEL, FINAL_LABEL
from sd3exp.io import read_json
from sd3exp.layout import RunLayout
from sd3exp.project import ROOT
from sd3exp.schema import ExperimentConfig

Metric = Tuple[str, float, int]  # key, value, step
TAG = "sd3exp."  # prefix of sd3exp's own MLflow tags


@dataclass
class RunRecord:
    key: str  # the run's identity in a tracker: its folder and config hash, hashed
    name: str
    params: Dict[str, str]
    tags: Dict[str, str]
    metrics: List[Metric]
    artifacts: List[Tuple[Path, str]]  # file, folder in the tracker's artifacts
    images: List[Tuple[str, Path, int]]  # tag, PNG, step
    best: Optional[Dict[str, Any]] = field(default=None)


def flatten(data: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """`a.b.c` -> value (lists and scalars as JSON, strings as they are)."""
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], data if isinstance(data, str) else json.dumps(data)


def git_commit() -> Optional[str]:
    """The project checkout's commit, None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cell_step(cell: Dict[str, Any], final_step: int) -> int:
    """A cell's step: the base model 0, the final model the planned last step."""
    if cell["step"] is not None:
        return int(cell["step"])
    return 0 if cell["label"] == BASE_LABEL else final_step


def score_metrics(cells: List[Dict[str, Any]], final_step: int) -> List[Metric]:
    """score/<measure> (mean of a checkpoint's cells; the base model at step 0) and
    score/<measure>/p<prompt>_s<seed> by step; the final model's as final/<measure>[/...] at the last step
    (the last checkpoint may share its step)."""
    means: Dict[Tuple[str, int], List[float]] = {}
    out: List[Metric] = []
    for cell in cells:
        if cell["status"] != "ok":
            continue
        step, group = cell_step(cell, final_step), "final" if cell["label"] == FINAL_LABEL else "score"
        axis = f"p{cell['prompt_index']}_s{cell['seed']}"
        for measure, value in (cell.get("scores") or {}).items():
            if value is None or not math.isfinite(value):
                continue
            out.append((f"{group}/{measure}/{axis}", float(value), step))
            means.setdefault((f"{group}/{measure}", step), []).append(float(value))
    return [(key, fmean(v), s) for (key, s), v in sorted(means.items())] + out


def training_metrics(records: List[Dict[str, Any]]) -> List[Metric]:
    """SimpleTuner's training_metrics.jsonl records (report_to=simpletuner): train/<name> by step, numbers only."""
    return [(f"train/{k}", float(v), int(r["step"])) for r in records
            for k, v in r["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def checkpoint_images(cells: List[Dict[str, Any]], eval_dir: Path, final_step: int) -> List[Tuple[str, Path, int]]:
    """Each checkpoint's render of each prompt (first seed) by step: a slider over training in TensorBoard
    (the base and final models have no step of their own)."""
    seen, out = set(), []
    for cell in cells:
        key = (cell["label"], cell["prompt_index"])
        if cell["status"] == "ok" and cell["paths"] and key not in seen and cell["step"] is not None:
            seen.add(key)
            out.append((f"render/prompt{cell['prompt_index']}", eval_dir / cell["paths"][0], cell_step(cell, final_step)))
    return out


def run_record(cfg: ExperimentConfig, run_dir: Path, config_hash: str, overrides: List[str],
               training: List[Dict[str, Any]]) -> RunRecord:
    """Everything the trackers get; `training`: SimpleTuner's metric records (sd3exp.evaluate.score.training_metrics)."""
    from omegaconf import OmegaConf

    run = RunLayout(run_dir, Path(cfg.paths.training_dir))
    ev = run.eval
    plan = read_json(run.plan) if run.plan.is_file() else {}
    final_step = int(plan.get("max_train_steps", 0))
    cells = read_json(ev.cells) if ev.cells.is_file() else []
    best = read_json(ev.best) if ev.best.is_file() else None
    params = dict(flatten(OmegaConf.to_container(OmegaConf.structured(cfg))))
    params["overrides"] = " ".join(overrides)
    chosen = best["best"] if best else None
    tags = {f"{TAG}experiment": cfg.name, f"{TAG}model": f"{cfg.model.path} ({cfg.model.type})",
            f"{TAG}run_dir": str(run_dir.resolve()), f"{TAG}config_hash": config_hash,
            f"{TAG}best_checkpoint": chosen["label"] if chosen else "none",
            f"{TAG}best_step": str(chosen["step"]) if chosen else "none"}
    commit = git_commit()
    if commit:
        tags[f"{TAG}git_commit"] = commit
    if best:
        tags[f"{TAG}objective"] = best["rule"]["objective"]
    metrics = score_metrics(cells, final_step) + training_metrics(training)
    if chosen and best:
        metrics.append(("objective", float(chosen["scores"][best["rule"]["objective"]]), int(chosen["step"] or final_step)))
    grids = sorted(ev.folder.glob("grid*.png"))
    artifacts = [(p, "eval") for p in [*grids, ev.report, ev.scores_plot, ev.training_plot, ev.best, ev.cells]
                 if p.is_file()]
    artifacts += [(run_dir / f, "config") for f in RunLayout.COMPILED if (run_dir / f).is_file()]
    artifacts += [(p, "") for p in (run.plan, run.resolved) if p.is_file()]
    images = [(f"grid/{p.stem}", p, final_step) for p in grids] + checkpoint_images(cells, ev.folder, final_step)
    key = hashlib.sha256(f"{run_dir.resolve()}\n{config_hash}".encode()).hexdigest()[:32]
    return RunRecord(key, run_dir.name, params, tags, metrics, artifacts, images, chosen)
