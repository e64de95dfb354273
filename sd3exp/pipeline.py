"""The pipeline: validate -> plan -> (audit, prepare) -> compile -> train -> eval -> report.

Pure stages live in their own modules; this one does the I/O between them:
which files go where in the run folder, and what is printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sd3exp import __version__, cache, holdout, lrplot, runfolder
from sd3exp.errors import ConfigError
from sd3exp.compile import Compiled, compile_experiment, config_hash
from sd3exp.io import dumps_json, read_json, write_if_changed
from sd3exp.plan import Plan, make_plan, render_table
from sd3exp.schema import ExperimentConfig
from sd3exp.validate import validate

DATA_STAGES = ("prepare", "audit", "train", "all")
CAPTION_STAGES = ("caption", "review")  # read the dataset, never the model
READ_ONLY_STAGES = ("eval", "report")  # they only read checkpoints, whoever trained them


@dataclass
class Job:
    """A composed, validated experiment and where it runs."""

    cfg: ExperimentConfig
    run_dir: Path
    overrides: str
    resolved_yaml: str
    config_hash: str


def overrides_of(cfg: DictConfig) -> str:
    try:
        return runfolder.training_overrides(list(HydraConfig.get().overrides.task))
    except ValueError:
        return ""


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Concept folders relative to the project root (paths.root_dir) made absolute."""
    root = Path(cfg.paths.root_dir)
    concepts = [replace(c, path=str((root / c.path).resolve())) for c in cfg.concepts]
    return replace(cfg, concepts=concepts)


def record_view(resolved: dict) -> dict:
    """The resolved config as recorded in resolved.yaml: without per-invocation switches."""
    view = {k: v for k, v in resolved.items() if k != "stage"}
    view["trainer"] = {k: v for k, v in view["trainer"].items() if k not in ("new_run", "force")}
    return view


def load(cfg: DictConfig) -> Job:
    """Resolve, type-check and validate a composed config."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    sha = config_hash(resolved)
    resolved_yaml = OmegaConf.to_yaml(record_view(resolved))
    exp = absolute_paths(OmegaConf.to_object(cfg))
    validate(exp)
    if exp.demo:
        from sd3exp.demo import ensure_demo_assets

        ensure_demo_assets(exp, with_model=exp.stage in DATA_STAGES + ("eval",))
    validate(exp, need_data=exp.stage in DATA_STAGES + CAPTION_STAGES)
    return Job(exp, Path(exp.paths.run_dir).resolve(), overrides_of(cfg), resolved_yaml, sha)


def held_out_images(cfg: ExperimentConfig) -> Dict[str, List[str]]:
    """The images each concept holds out of training (concepts[].holdout), where its folder exists;
    ConfigError when that leaves no image to train on."""
    from sd3exp.images import list_images

    out = {}
    for i, c in enumerate(cfg.concepts):
        if c.holdout and Path(c.path).is_dir():
            names = [p.name for p in list_images(Path(c.path))]
            holdout.check_count(c, i, len(names))
            out[c.id] = holdout.held_out(c, names, cfg.seed)
    return out


def concept_sizes(cfg: ExperimentConfig) -> Dict[str, Optional[List[Tuple[int, int]]]]:
    """Sizes of the images each concept trains on, read from disk where the folder exists (held-out
    images and files whose header cannot be read are left out, the latter with a warning: the audit
    refuses them before training)."""
    from sd3exp.images import FIX, IMAGE_EXTENSIONS, readable_sizes

    held = held_out_images(cfg)
    sizes: Dict[str, Optional[List[Tuple[int, int]]]] = {}
    for i, c in enumerate(cfg.concepts):
        if not Path(c.path).is_dir():
            if c.num_images is None:
                raise ConfigError(f"concepts[{i}].path", c.path, "folder not found and no num_images declared",
                                  "create the folder, or declare concepts[].num_images to plan without it")
            sizes[c.id] = None
            continue
        sizes[c.id], unreadable = readable_sizes(Path(c.path), held.get(c.id, ()))
        if not sizes[c.id] and not unreadable:
            raise ConfigError(f"concepts[{i}].path", c.path, f"no images there ({', '.join(IMAGE_EXTENSIONS)})",
                              "point it at the folder of images with .txt captions")
        for name, why in unreadable.items():
            print(f"warning: concepts[{i}].path: {Path(c.path) / name}: {why}; left out of the plan "
                  f"(the audit refuses it before training). Fix: {FIX}")
    return sizes


def build(job: Job) -> Tuple[Plan, Compiled]:
    plan = replace(make_plan(job.cfg, concept_sizes(job.cfg), held_out_images(job.cfg)),
                   cache_dir=str(cache.cache_dir(job.cfg)))
    return plan, compile_experiment(job.cfg, plan, job.run_dir, job.config_hash, job.overrides)


def record_of(job: Job) -> runfolder.RunRecord:
    return runfolder.RunRecord(job.cfg.name, job.overrides, job.config_hash, __version__)


def plan_change(run_dir: Path, plan: Plan) -> Optional[str]:
    """How the run folder's plan.json differs from `plan` of the same config (the images on disk
    changed), in words; None when it does not."""
    path = run_dir / "plan.json"
    old = read_json(path) if path.is_file() and runfolder.read_record(run_dir) else None
    if old is None or old == json.loads(dumps_json(plan.to_dict())):
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
                                        reading=job.cfg.stage in READ_ONLY_STAGES)
    runfolder.check_apart(run_dir, folders)
    if run_dir == job.run_dir:
        return job
    print(f"trainer.new_run: starting a new run folder {run_dir}")
    return load(OmegaConf.merge(cfg, {"paths": {"run_dir": str(run_dir)}}))


def files_of(job: Job, plan: Plan, compiled: Compiled) -> Dict[str, str]:
    files = dict(compiled.files)
    files["plan.json"] = dumps_json(plan.to_dict())
    files["resolved.yaml"] = job.resolved_yaml
    return files


def write_run(job: Job, plan: Plan, compiled: Compiled) -> List[str]:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    runfolder.write_record(job.run_dir, record_of(job))  # first: the folder is sd3exp's before anything else is
    changed = runfolder.written(job.run_dir, files_of(job, plan, compiled))
    write_if_changed(job.run_dir / "lr_curve.png", lrplot.render_plan(plan))
    return changed


def stage_compile(job: Job, cfg: DictConfig) -> Tuple[Job, Plan]:
    """Plan, compile and write the run folder (compiled files do not depend on where it is)."""
    plan, compiled = build(job)
    job = claim(job, cfg, plan)
    changed = write_run(job, plan, compiled)
    print(render_table(plan))
    state = f"{len(changed)} file(s) written" if changed else "unchanged"
    print(f"\ncompiled {job.cfg.name} -> {job.run_dir}/config ({state})")
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


def run(cfg: DictConfig) -> Optional[float]:
    """Run the stages asked for; returns the run's objective (the best checkpoint's score, NaN
    when nothing was chosen) after an evaluation, so Hydra sweepers can optimise it."""
    run_dir = Path(cfg.paths.run_dir)
    try:
        job = load(cfg)
        if job.cfg.stage == "plan":
            plan, _ = build(job)
            print(render_table(plan))
            return None
        job, plan = stage_compile(job, cfg)
    finally:
        discard_empty(run_dir, Path(cfg.paths.output_root))
    run_later_stages(job, plan)
    if job.cfg.stage not in ("eval", "all"):
        return None
    from sd3exp.evaluate.score import objective

    return objective(job.run_dir)


def run_later_stages(job: Job, plan: Plan) -> None:
    stage = job.cfg.stage
    if stage == "compile":
        return
    from sd3exp import stages

    with runfolder.exclusive(job.run_dir, stage):
        stages.run_stage(stage, job, plan)
