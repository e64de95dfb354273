"""The stages after compile: caption, review, audit, prepare, train, eval, report (and `all`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Dict, Optional

from sd3exp import cache, console
from sd3exp.compile import trainer_args, user_extra_args
from sd3exp.errors import ConfigError, DatasetError, EvalError
from sd3exp.hub import require_model, token_source
from sd3exp.job import Invocation, Job
from sd3exp.plan import Plan
from sd3exp.runfolder import checkpoint_dirs, claim_training_dir, set_aside_unfinished
from sd3exp.schema import ExperimentConfig
from sd3exp.signals import stopped
from sd3exp.stage_table import STAGES
from sd3exp.trainer_env import trainer_for

ONE_OFF = ("stage=", "trainer.new_run=", "trainer.force=")


def command_for(job: Job, stage: str) -> str:
    """This command line again for another stage, aimed at the same run folder."""
    return command_line(job.run_dir, job.cfg.name, stage, job.invocation)


def command_line(run_dir: Path, name: str, stage: str, run: Optional[Invocation]) -> str:
    """This command line again for `stage`, aimed at `run_dir` (experiment `name`)."""
    if run is None:  # not run by Hydra
        task = [f"experiment={name}"] if name != "default" else []
    else:
        task = [o for o in run.task if not o.startswith(ONE_OFF)]
        if run.multirun or run.run_dir_given or run.output_dir is None or run.output_dir.resolve() != run_dir:
            task.append(f"hydra.run.dir={run_dir}")
    return shlex.join(["python", "-m", "sd3exp", *task] + ([f"stage={stage}"] if stage != "all" else []))


def stage_audit(job: Job, plan: Plan) -> None:
    from sd3exp import audit

    try:
        report = audit.audit(job.cfg)
    except KeyboardInterrupt as exc:
        raise stopped(exc, "the caption audit", "it only reads your images and captions; audit.json is "
                      "written when it finishes", command_for(job, job.cfg.stage)) from None
    console.info(audit.write_audit(report, job.layout.audit))
    errors = audit.audit_errors(report, job.cfg)
    if errors:
        raise DatasetError("the caption audit found problems that would spoil training:\n  - "
                           + "\n  - ".join(errors) + f"\nDetails: {job.layout.audit}")


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
    console.info(audit.write_audit(report, job.layout.audit))
    console.info(f"review: {write_review(job.cfg, report, generated, job.run_dir)}")


def stage_prepare(job: Job, plan: Plan) -> None:
    from sd3exp import prepare

    stage_audit(job, plan)
    try:
        summary = prepare.prepare(job.cfg)
    except KeyboardInterrupt as exc:
        raise stopped(exc, "preparing the dataset", f"each concept's folder in {job.cfg.dataset.prepared_dir} "
                      "is complete or as it was (a half-built one is removed; the next run builds only what "
                      "differs); your images are untouched", command_for(job, job.cfg.stage)) from None
    console.info(summary.line())


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
    from sd3exp import live, preflight, train

    cfg, run_dir = job.cfg, job.run_dir
    training_dir = Path(cfg.paths.training_dir)
    early = live.stop_of(run_dir)
    if early:
        console.info(f"training stopped early at step {early['step']} ({early['reason']}); nothing to do. "
                     f"To train on, start a new run: {command_for(job, cfg.stage)} trainer.new_run=true")
        return
    if train.is_complete(run_dir, training_dir, cfg.model.type, plan.max_train_steps):
        console.info(f"training already complete ({training_dir}); nothing to do")
        return
    live.check(cfg)
    stage_prepare(job, plan)
    env = trainer_for(cfg)
    model = require_model(cfg.model.path, env.python)
    console.info(f"model: {cfg.model.path}: {model.line()}; Hugging Face token: {token_source() or 'none found'}")
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
                                            offline=model.state in ("local", "cached"))
    next_command = command_for(job, "eval") if cfg.stage == "train" else None
    console.info(f"cache: {plan.cache_dir} (shared by the runs on the same data; sd3exp/cache.py)")
    with cache.filling(plan.cache_folder) as caches_complete, live.watching(cfg, run_dir):
        train.run_training(env.train_command(), run_dir, training_dir, process_env, plan.max_train_steps,
                           plan.checkpoint_steps, next_command, resume_command=command_for(job, cfg.stage),
                           on_first_step=caches_complete, model_type=cfg.model.type,
                           stopped_early=lambda: live.stop_of(run_dir))
    if not STAGES[cfg.stage].summary:  # else the run's summary names them
        for line in live.failure_lines(run_dir):
            console.warn(line)


def stage_eval(job: Job, plan: Plan) -> None:
    from sd3exp.evaluate.score import training_metrics
    from sd3exp.evaluate.stage import evaluate
    from sd3exp.tracking import log_run

    evaluate(job.cfg, job.run_dir, command_for(job, "eval"))
    from sd3exp.live import report_trial

    report_trial(job.cfg, job.run_dir)  # an Optuna trial: the checkpoints its watcher did not report
    task = list(job.invocation.task) if job.invocation else []
    records = training_metrics(Path(job.cfg.paths.training_dir))
    for line in log_run(job.cfg, job.run_dir, job.config_hash, task, records, command_for(job, "eval")):
        console.info(line)


def stage_report(job: Job, plan: Plan) -> None:
    """Rebuild the grid(s) and report.html from eval/cells.json (e.g. after changing a template)."""
    from sd3exp.evaluate import cells, grid, report, score

    evaluation = job.layout.eval
    eval_dir = evaluation.folder
    if not evaluation.cells.is_file():
        raise EvalError(f"no evaluation in {eval_dir}; run stage=eval first")
    found = cells.read_cells_json(evaluation.cells)
    best = (score.read_best(eval_dir) or {}).get("best")
    grids = grid.write_grids(found, eval_dir, job.cfg.eval.max_grid_pixels, best=best["label"] if best else None,
                             best_variant=best.get("variant") if best else None)
    console.info(f"report: {report.write_report(job.run_dir, found, grids, title=job.cfg.name)}")


def summary(job: Job) -> str:
    """What a full run produced, and where."""
    run = job.layout
    steps = list(checkpoint_dirs(run.training))
    rows = [("run folder", run.run_dir), ("compiled", run.config_dir), ("plan", run.plan),
            ("checkpoints", f"{len(steps)} (steps {', '.join(map(str, steps))})" if steps else "none"),
            ("train log", run.train_log)]
    rows += [(name, path) for name, path in (("grid", run.eval.grid),
                                             ("report", run.eval.report),
                                             ("best", run.eval.best)) if path.exists()]
    lines = [f"\n{job.cfg.name}: done"] + [f"  {k:<12} {v}" for k, v in rows]
    if run.eval.best.exists():
        from sd3exp.best import run_line
        from sd3exp.io import read_json

        lines.append(f"best checkpoint: {run_line(read_json(run.eval.best))}")
    from sd3exp.live import summary_lines

    lines += summary_lines(job.run_dir)
    return "\n".join(lines)


STEPS: Dict[str, Callable[[Job, Plan], None]] = {  # the steps of sd3exp/stage_table.py's stages, by name
    "caption": stage_caption, "review": stage_review, "audit": stage_audit, "prepare": stage_prepare,
    "train": stage_train, "eval": stage_eval, "report": stage_report,
}


def step(name: str) -> Callable[[Job, Plan], None]:
    """The function that runs the step `name` of a stage (sd3exp/stage_table.py)."""
    return STEPS[name]


def run_stage(stage: str, job: Job, plan: Plan) -> None:
    for name in STAGES[stage].steps:
        step(name)(job, plan)
    if STAGES[stage].summary:
        console.info(summary(job))
