"""The pipeline: validate -> plan -> (audit, prepare) -> compile -> train -> eval -> report.

Pure stages live in their own modules; this one does the I/O between them:
which files go where in the run folder, and what is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple, cast

from omegaconf import DictConfig, OmegaConf

from sd3exp import __version__, console, estimate, runfolder
from sd3exp.compile import Compiled
from sd3exp.io import dumps_json, read_json, remove_stale_temporaries
from sd3exp.job import Invocation, Job, build, checked_plan, files_of, load
from sd3exp.layout import RunLayout
from sd3exp.plan import Plan, render_table
from sd3exp.signals import Stopped, sigterm_raises, stopped
from sd3exp.stage_table import STAGES


def record_of(job: Job) -> runfolder.RunRecord:
    return runfolder.RunRecord(job.cfg.name, job.overrides, job.config_hash, __version__)


DERIVED = {"estimate": None, "warnings": None}  # plan.json keys that do not describe the images


def plan_change(run_dir: Path, plan: Plan) -> Optional[str]:
    """How the run folder's plan.json differs from `plan` of the same config (the images on disk
    changed), in words; None when it does not."""
    path = RunLayout(run_dir).plan
    old = read_json(path) if path.is_file() and runfolder.read_record(run_dir) else None
    new = json.loads(dumps_json(plan.to_dict()))
    # the estimate (and the warnings drawn from it) follow the model's shape, known only once the model is
    # local or cached: not a change of the images
    if old is None or {**old, **DERIVED} == {**new, **DERIVED}:
        return None
    def counts(p: dict) -> str:
        images = ", ".join(f"{c['id']}: {c['images']}" for c in p["concepts"])
        return f"images {images}; {p['max_train_steps']} steps, checkpoints {p['checkpoint_steps']}"
    return f"plan.json: {counts(old)}; the image folders now give {counts(plan.to_dict())}"


def claim(job: Job, cfg: DictConfig, plan: Plan) -> Job:
    """Apply the run-folder guards; trainer.new_run may move the job to a fresh sibling folder,
    where `cfg` is resolved again (every path under the run folder follows it)."""
    t = job.cfg.trainer
    training = Path(job.cfg.paths.training_dir)
    folders = [(f"concepts[{i}].path", Path(c.path)) for i, c in enumerate(job.cfg.concepts)]
    runfolder.check_apart(job.run_dir, folders)
    run_dir = runfolder.resolve_run_dir(job.run_dir, record_of(job), training, t.force, t.new_run,
                                        plan_change(job.run_dir, plan),
                                        reading=STAGES[job.cfg.stage].reads_checkpoints)
    runfolder.check_apart(run_dir, folders)
    if run_dir == job.run_dir:
        return job
    console.info(f"trainer.new_run: starting a new run folder {run_dir}")
    return load(cast(DictConfig, OmegaConf.merge(cfg, {"paths": {"run_dir": str(run_dir)}})), job.invocation)


def write_run(job: Job, plan: Plan, compiled: Compiled) -> List[str]:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    runfolder.write_record(job.run_dir, record_of(job))  # first: the folder is sd3exp's before anything else is
    remove_stale_temporaries(job.run_dir)  # writes of an earlier sd3exp cut short by a kill
    return runfolder.written(job.run_dir, files_of(job, plan, compiled))


def warn_disk(plan: Plan, run_dir: Path, keep: int) -> None:
    """Warn when the kept checkpoints exceed the free disk at the run folder (not in plan.json: it is this machine's)."""
    est = estimate.from_dict(plan.estimate)
    warning = est and estimate.disk_warning(est, run_dir, len(plan.checkpoints_kept), keep, plan.experiment)
    if warning:
        console.warn(warning)


def stage_compile(job: Job, cfg: DictConfig) -> Tuple[Job, Plan]:
    """Plan, compile and write the run folder (compiled files do not depend on where it is)."""
    plan, compiled = build(job)
    job = claim(job, cfg, plan)
    changed = write_run(job, plan, compiled)
    console.info(render_table(plan))
    warn_disk(plan, job.run_dir, job.cfg.checkpointing.keep)
    state = f"{len(changed)} file(s) written" if changed else "unchanged"
    console.info(f"\ncompiled {job.cfg.name} -> {job.run_dir}/config ({state})")
    return job, plan


def discard_empty(run_dir: Path, output_root: Path) -> None:
    """Remove the run folder Hydra created for this call if nothing was written to it, and the
    folders Hydra made above it inside paths.output_root that are left empty."""
    root, folder = output_root.resolve(), run_dir.resolve()
    while folder.is_dir() and not any(folder.iterdir()):
        try:
            folder.rmdir()
        except OSError:  # another process has just written to it
            return
        if folder.parent == root or root not in folder.parent.parents:
            return
        folder = folder.parent


def run(cfg: DictConfig, invocation: Optional[Invocation] = None) -> Optional[float]:
    """Run the stages asked for; returns the run's objective (the best checkpoint's score, NaN
    when nothing was chosen) after an evaluation, so Hydra sweepers can optimise it. SIGTERM
    stops every stage the way Ctrl-C does."""
    run_dir = Path(cfg.paths.run_dir)
    with sigterm_raises(Stopped):
        try:
            job = load(cfg, invocation)
            if not STAGES[job.cfg.stage].compiles:
                plan = checked_plan(job)
                console.info(render_table(plan))
                warn_disk(plan, job.run_dir, job.cfg.checkpointing.keep)
                return None
            job, plan = stage_compile(job, cfg)
        except KeyboardInterrupt as exc:
            from sd3exp.stages import command_line

            again = command_line(run_dir.resolve(), str(cfg.name), str(cfg.stage), invocation)
            raise stopped(exc, "planning and compiling", "each file written to the run folder is whole (written "
                          "whole or not at all); nothing was prepared or trained", again) from None
        finally:
            discard_empty(run_dir, Path(cfg.paths.output_root))
        run_later_stages(job, plan)
    if not STAGES[job.cfg.stage].evaluates:
        return None
    from sd3exp.evaluate.score import objective

    return objective(job.run_dir)


def run_later_stages(job: Job, plan: Plan) -> None:
    stage = job.cfg.stage
    if not STAGES[stage].steps:
        return
    from sd3exp import stages

    with runfolder.exclusive(job.run_dir, stage):
        try:
            stages.run_stage(stage, job, plan)
        except KeyboardInterrupt as exc:  # where no stage said more: compile's files and checkpoints are whole
            raise stopped(exc, f"stage={stage}", "the files written so far are whole (each is written whole or "
                          "not at all); no checkpoint was changed", stages.command_for(job, stage)) from None
