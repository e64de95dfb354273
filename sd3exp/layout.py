"""Every file and folder of a run, by name: the one place the run folder's layout is written down.

    <run>/config/{config.env,multibackend.json,config.json}   compiled for SimpleTuner
    <run>/plan.json, resolved.yaml, run.json, lr_curve.png      the plan, the config, the record (the chart: with the report)
    <run>/train.log, training_summary.json, audit.json          training and the caption audit
    <run>/review.html                                           the caption review page
    <run>/history/<config>/                                     compiled files of an earlier config
    <run>/eval/{cells.json,request.json,report.html,images/,best.json,scores.png,training.png,grid*.png}
    <run>/eval.next/, eval.previous-N/                          an evaluation being built, earlier ones
    <training>/checkpoint-N/, .sd3exp-run, unfinished-checkpoints/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Tuple, cast


@dataclass(frozen=True)
class EvalLayout:
    """An evaluation folder: eval/, or one being built (eval.next) or kept (eval.previous-N)."""

    folder: Path

    CELLS: ClassVar[str] = "cells.json"
    REQUEST: ClassVar[str] = "request.json"
    REPORT: ClassVar[str] = "report.html"
    IMAGES: ClassVar[str] = "images"
    BEST: ClassVar[str] = "best.json"
    SCORES_PLOT: ClassVar[str] = "scores.png"
    TRAINING_PLOT: ClassVar[str] = "training.png"
    GRID: ClassVar[str] = "grid.png"
    RENDER_JOB: ClassVar[str] = "render-job.json"  # the diffusers worker's job and log
    RENDER_LOG: ClassVar[str] = "render.log"

    @property
    def cells(self) -> Path:
        return self.folder / self.CELLS

    @property
    def request(self) -> Path:
        return self.folder / self.REQUEST

    @property
    def report(self) -> Path:
        return self.folder / self.REPORT

    @property
    def images(self) -> Path:
        return self.folder / self.IMAGES

    @property
    def best(self) -> Path:
        return self.folder / self.BEST

    @property
    def scores_plot(self) -> Path:
        return self.folder / self.SCORES_PLOT

    @property
    def training_plot(self) -> Path:
        return self.folder / self.TRAINING_PLOT

    @property
    def grid(self) -> Path:
        return self.folder / self.GRID

    @property
    def render_job(self) -> Path:
        return self.folder / self.RENDER_JOB

    @property
    def render_log(self) -> Path:
        return self.folder / self.RENDER_LOG


@dataclass(frozen=True)
class RunLayout:
    """The files and folders of the run in `run_dir` whose checkpoints are in `training_dir`
    (paths.training_dir; by default `training/` inside the run folder)."""

    run_dir: Path
    training_dir: Optional[Path] = field(default=None)

    CONFIG: ClassVar[str] = "config"
    CONFIG_ENV: ClassVar[str] = "config/config.env"
    MULTIBACKEND: ClassVar[str] = "config/multibackend.json"
    CONFIG_JSON: ClassVar[str] = "config/config.json"
    PLAN: ClassVar[str] = "plan.json"
    RESOLVED: ClassVar[str] = "resolved.yaml"
    RECORD: ClassVar[str] = "run.json"
    LR_CURVE: ClassVar[str] = "lr_curve.png"
    TRAIN_LOG: ClassVar[str] = "train.log"
    TRAINING_SUMMARY: ClassVar[str] = "training_summary.json"
    AUDIT: ClassVar[str] = "audit.json"
    REVIEW: ClassVar[str] = "review.html"
    HISTORY: ClassVar[str] = "history"
    EXTRA_PATHS: ClassVar[str] = "comfyui_extra_model_paths.yaml"
    PREFLIGHT: ClassVar[str] = ".preflight.json"  # the last successful check of the compiled files
    EVAL: ClassVar[str] = "eval"
    EVAL_STAGING: ClassVar[str] = "eval.next"
    EVAL_PREVIOUS: ClassVar[str] = "eval.previous-"  # + N
    TRAINING: ClassVar[str] = "training"
    OWNER: ClassVar[str] = ".sd3exp-run"  # in the training folder: the run folder that trained there
    UNFINISHED: ClassVar[str] = "unfinished-checkpoints"  # in the training folder

    COMPILED: ClassVar[Tuple[str, ...]] = (CONFIG_ENV, MULTIBACKEND, CONFIG_JSON)
    SETTINGS_FILES: ClassVar[Tuple[str, ...]] = COMPILED + (PLAN,)  # what `sd3exp lock` snapshots
    ARCHIVED: ClassVar[Tuple[str, ...]] = (CONFIG, PLAN, RESOLVED, RECORD)  # kept under history/ on a forced recompile
    TRAINED: ClassVar[Tuple[str, ...]] = (TRAIN_LOG, TRAINING_SUMMARY, EVAL)  # moved there with the weights when
    # a forced recompile changes the config (sd3exp/runfolder.py set_aside_training)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "training_dir", Path(self.training_dir or self.run_dir / self.TRAINING))

    @property
    def training(self) -> Path:
        """training_dir, which __post_init__ has set (never None)."""
        return cast(Path, self.training_dir)

    @property
    def config_dir(self) -> Path:
        return self.run_dir / self.CONFIG

    @property
    def config_env(self) -> Path:
        return self.run_dir / self.CONFIG_ENV

    @property
    def multibackend(self) -> Path:
        return self.run_dir / self.MULTIBACKEND

    @property
    def plan(self) -> Path:
        return self.run_dir / self.PLAN

    @property
    def resolved(self) -> Path:
        return self.run_dir / self.RESOLVED

    @property
    def record(self) -> Path:
        return self.run_dir / self.RECORD

    @property
    def lr_curve(self) -> Path:
        return self.run_dir / self.LR_CURVE

    def lr_curve_outdated(self) -> bool:
        """Whether lr_curve.png is to be drawn: plan.json is there and the chart is missing or older (the
        test sd3exp.plots.draw_lr_curve makes, asked without loading matplotlib)."""
        if not self.plan.is_file():
            return False
        return not self.lr_curve.is_file() or self.lr_curve.stat().st_mtime_ns < self.plan.stat().st_mtime_ns

    @property
    def train_log(self) -> Path:
        return self.run_dir / self.TRAIN_LOG

    @property
    def training_summary(self) -> Path:
        return self.run_dir / self.TRAINING_SUMMARY

    @property
    def audit(self) -> Path:
        return self.run_dir / self.AUDIT

    @property
    def review(self) -> Path:
        return self.run_dir / self.REVIEW

    def history(self, config_hash: str) -> Path:
        return self.run_dir / self.HISTORY / config_hash[:12]

    @property
    def extra_paths(self) -> Path:
        return self.run_dir / self.EXTRA_PATHS

    @property
    def preflight(self) -> Path:
        return self.run_dir / self.PREFLIGHT

    @property
    def eval(self) -> EvalLayout:
        return EvalLayout(self.run_dir / self.EVAL)

    @property
    def eval_staging(self) -> EvalLayout:
        return EvalLayout(self.run_dir / self.EVAL_STAGING)

    def previous_eval(self, n: int) -> Path:
        return self.run_dir / f"{self.EVAL_PREVIOUS}{n}"

    @property
    def owner(self) -> Path:
        return self.training / self.OWNER

    @property
    def unfinished(self) -> Path:
        return self.training / self.UNFINISHED
