"""The stages after compile: caption, review, audit, prepare, train, eval, report (and `all`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Dict, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from sd3exp import cache, console, trainer_env
from sd3exp.compile import trainer_args, user_extra_args
from sd3exp.errors import ConfigError, DatasetError, EvalError
from sd3exp.pipeline import Job
from sd3exp.runfolder import checkpoint_dirs, claim_training_dir, set_aside_unfinished
from sd3exp.plan import Plan
from sd3exp.schema import ExperimentConfig


ONE_OFF = ("stage=", "trainer.new_run=", "trainer.force=")


def command_for(job: Job, stage: str) -> str:
    """This command line again for another stage, aimed at the same run folder."""
    try:
        hydra = HydraConfig.get()
        task = [o for o in hydra.overrides.task if not o.startswith(ONE_OFF)]
        if hydra.mode == RunMode.MULTIRUN or any(o.startswith("hydra.run.dir=") for o in hydra.overrides.hydra) \
                or Path(hydra.runtime.output_dir).resolve() != job.run_dir:
            task.append(f"hydra.run.dir={job.run_dir}")
    except ValueError:  # not run by Hydra
        task = [f"experiment={job.cfg.name}"] if job.cfg.name != "default" else []
    return shlex.join(["python", "-m", "sd3exp", *task] + ([f"stage={stage}"] if stage != "all" else []))


def stage_audit(job: Job, plan: Plan) -> None:
    from sd3exp import audit

    report = audit.audit(job.cfg)
    console.info(audit.write_audit(report, job.run_dir / "audit.json"))
    errors = audit.audit_errors(report, job.cfg)
    if errors:
        raise DatasetError("the caption audit found problems that would spoil training:\n  - "
                           + "\n  - ".join(errors) + f"\nDetails: {job.run_dir / 'audit.json'}")


def stage_caption(job: Job, plan: Plan) -> None:
    """Caption the images (sd3exp.caption.run) into the caption store; your caption files stay as they are."""
    from sd3exp.caption.run import caption

    caption(job.cfg, again=command_for(job, "caption"))
    console.info(f"next: review the captions with `{command_for(job, 'review')}`")


def stage_review(job: Job, plan: Plan) -> None:
    """Audit the captions training would use and write review.html (problems are shown, not raised)."""
    from sd3exp import audit
    from sd3exp.caption.page import write_review
    from sd3exp.caption.sources import generated_captions

    generated = {c.id: generated_captions(c, job.cfg.captioner) for c in job.cfg.concepts}
    report = audit.audit(job.cfg, generated)
    console.info(audit.write_audit(report, job.run_dir / "audit.json"))
    console.info(f"review: {write_review(job.cfg, report, generated, job.run_dir)}")


def stage_prepare(job: Job, plan: Plan) -> None:
    from sd3exp import prepare

    stage_audit(job, plan)
    summary = prepare.prepare(job.cfg)
    console.info(summary.line())


def trainer_for(cfg: ExperimentConfig) -> trainer_env.TrainerEnv:
    t = cfg.trainer
    env = trainer_env.locate(t.simpletuner, t.version, t.home)
    console.info(f"trainer: SimpleTuner {env.version} ({env.kind}) at {env.root}")
    return env


def cpu_shim(cfg: ExperimentConfig, cuda: bool) -> Optional[str]:
    """The notice that the training process gets the pin_memory shim; None when it does not (never with CUDA)."""
    if not cuda and cfg.training.num_processes > 1:
        raise ConfigError("training.num_processes", cfg.training.num_processes,
                          "there is no CUDA device: accelerate would run one process, not the number planned",
                          "use training.num_processes=1 on a CPU")
    if not cuda and cfg.trainer.cpu_shim == "auto":
        return "no CUDA device: applying sd3exp's pin_memory CPU shim to the training process"
    return None


def stage_train(job: Job, plan: Plan) -> None:
    from sd3exp import preflight, train

    cfg, run_dir = job.cfg, job.run_dir
    training_dir = Path(cfg.paths.training_dir)
    if train.is_complete(run_dir, training_dir, cfg.model.type, plan.max_train_steps):
        console.info(f"training already complete ({training_dir}); nothing to do")
        return
    stage_prepare(job, plan)
    env = trainer_for(cfg)
    args = trainer_args(cfg, plan, run_dir) + user_extra_args(cfg)
    checked = preflight.preflight(env, run_dir, args)
    shim = cpu_shim(cfg, checked["cuda"])
    if shim:
        console.info(shim)
    claim_training_dir(training_dir, run_dir)
    for path, target in set_aside_unfinished(training_dir, checked.get("checkpoint_guard")):
        console.info(f"{path.name} was never finished (its save was interrupted): moved to {target}; "
                     "resuming from the last finished checkpoint")
    process_env = train.trainer_environment(env.bin, run_dir, cpu=shim is not None,
                                            offline=Path(cfg.model.path).is_dir())
    next_command = command_for(job, "eval") if cfg.stage == "train" else None
    console.info(f"cache: {plan.cache_dir} (shared by the runs on the same data; sd3exp/cache.py)")
    with cache.filling(Path(plan.cache_dir)) as caches_complete:
        train.run_training(env.train_command(), run_dir, training_dir, process_env, plan.max_train_steps,
                           plan.checkpoint_steps, next_command, resume_command=command_for(job, cfg.stage),
                           on_first_step=caches_complete, model_type=cfg.model.type)


def stage_eval(job: Job, plan: Plan) -> None:
    from sd3exp.evaluate.stage import evaluate

    evaluate(job.cfg, job.run_dir, command_for(job, "eval"))


def stage_report(job: Job, plan: Plan) -> None:
    """Rebuild the grid(s) and report.html from eval/cells.json (e.g. after changing a template)."""
    from sd3exp.evaluate import cells, grid, report, score

    eval_dir = job.run_dir / "eval"
    if not (eval_dir / "cells.json").is_file():
        raise EvalError(f"no evaluation in {eval_dir}; run stage=eval first")
    found = cells.read_cells_json(eval_dir / "cells.json")
    best = (score.read_best(eval_dir) or {}).get("best")
    grids = grid.write_grids(found, eval_dir, job.cfg.eval.max_grid_pixels, best=best["label"] if best else None)
    console.info(f"report: {report.write_report(job.run_dir, found, grids, title=job.cfg.name)}")


STAGES: Dict[str, Callable[[Job, Plan], None]] = {
    "caption": stage_caption,
    "review": stage_review,
    "audit": stage_audit,
    "prepare": stage_prepare,
    "train": stage_train,
    "eval": stage_eval,
    "report": stage_report,
}


def summary(job: Job) -> str:
    """What a full run produced, and where."""
    run = job.run_dir
    steps = list(checkpoint_dirs(Path(job.cfg.paths.training_dir)))
    rows = [("run folder", run), ("compiled", run / "config"), ("plan", run / "plan.json"),
            ("checkpoints", f"{len(steps)} (steps {', '.join(map(str, steps))})" if steps else "none"),
            ("train log", run / "train.log")]
    rows += [(name, path) for name, path in (("grid", run / "eval" / "grid.png"),
                                             ("report", run / "eval" / "report.html"),
                                             ("best", run / "eval" / "best.json")) if path.exists()]
    lines = [f"\n{job.cfg.name}: done"] + [f"  {k:<12} {v}" for k, v in rows]
    if (run / "eval" / "best.json").exists():
        from sd3exp.best import run_line
        from sd3exp.io import read_json

        lines.append(f"best checkpoint: {run_line(read_json(run / 'eval' / 'best.json'))}")
    return "\n".join(lines)


def run_stage(stage: str, job: Job, plan: Plan) -> None:
    for name in ("train", "eval") if stage == "all" else (stage,):
        STAGES[name](job, plan)
    if stage == "all":
        console.info(summary(job))
