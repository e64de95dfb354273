"""A composed, validated experiment and where it runs (`Job`), and how it was started (`Invocation`).

Hydra hands the config over once, in the command line's task function (sd3exp/cli.py); the
`Invocation` taken from it there travels on the Job, so no stage reads Hydra's global state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sd3exp import cache, console, holdout, runfolder
from sd3exp.compile import Compiled, compile_experiment, compile_inputs, config_hash
from sd3exp.errors import ConfigError, Sd3expError
from sd3exp.experiment import to_dict, to_experiment
from sd3exp.io import dumps_json
from sd3exp.layout import RunLayout
from sd3exp.plan import Plan, make_plan
from sd3exp.project import experiment_name, register
from sd3exp.schema import ExperimentConfig
from sd3exp.stage_table import STAGES
from sd3exp.validate import validate

RUN_DIR_DEFAULT = "${sd3exp.run_dir:}"  # conf/paths/default.yaml: Hydra's output folder


class ComposeError(Sd3expError):
    """An experiment spec that does not compose."""


@dataclass(frozen=True)
class Invocation:
    """How Hydra started this job: the command line's task overrides, whether it is one job of a
    multirun, Hydra's output folder for it, and whether hydra.run.dir was given."""

    task: Tuple[str, ...] = ()
    multirun: bool = False
    output_dir: Optional[Path] = None
    run_dir_given: bool = False

    @classmethod
    def of(cls, hydra: DictConfig) -> Invocation:
        """From Hydra's own config node (HydraConfig.get() in a job, cfg.hydra of a compose)."""
        output = OmegaConf.select(hydra, "runtime.output_dir", default=None)
        return cls(tuple(hydra.overrides.task), OmegaConf.select(hydra, "mode") == RunMode.MULTIRUN,
                   Path(output) if output else None,
                   any(o.startswith("hydra.run.dir=") for o in hydra.overrides.hydra))


@dataclass
class Job:
    """A composed, validated experiment and where it runs."""

    cfg: ExperimentConfig
    run_dir: Path
    overrides: str
    resolved_yaml: str
    config_hash: str
    invocation: Optional[Invocation] = None  # None: not started by Hydra

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir, Path(self.cfg.paths.training_dir))


def located(cfg: DictConfig, invocation: Invocation) -> DictConfig:
    """`cfg` with paths.run_dir at the invocation's output folder where it is left at its default: the
    job's own config (Hydra's copy without its hydra node) set in place, not merged into a copy."""
    if invocation.output_dir is not None and to_dict(cfg.paths)["run_dir"] == RUN_DIR_DEFAULT:
        cfg.paths.run_dir = str(invocation.output_dir)
    return cfg


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


def dump_yaml(data: dict) -> str:
    """OmegaConf.to_yaml(data) of a plain container, the same text without making a config of it first
    (about 20 ms of each job of a multirun went there)."""
    from omegaconf._utils import get_omega_conf_dumper

    return yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=get_omega_conf_dumper())


def load(cfg: DictConfig, invocation: Optional[Invocation] = None) -> Job:
    """Resolve, type-check and validate a composed config."""
    resolved = to_dict(cfg, resolve=True)
    sha = config_hash(resolved)
    resolved_yaml = dump_yaml(record_view(resolved))
    exp = absolute_paths(to_experiment(cfg))
    validate(exp)
    if exp.demo:
        from sd3exp.demo import ensure_demo_assets

        ensure_demo_assets(exp, with_model=STAGES[exp.stage].needs_model)
    validate(exp, need_data=STAGES[exp.stage].needs_data)
    overrides = runfolder.training_overrides(list(invocation.task)) if invocation else ""
    return Job(exp, Path(exp.paths.run_dir).resolve(), overrides, resolved_yaml, sha, invocation)


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
            console.warn(f"concepts[{i}].path: {Path(c.path) / name}: {why}; left out of the plan "
                         f"(the audit refuses it before training). Fix: {FIX}")
    return sizes


def concept_names(cfg: ExperimentConfig, sizes: Dict[str, Optional[List[Tuple[int, int]]]]) -> Dict[str, List[str]]:
    """The trained images' file names in the order of `sizes` (a concept with unreadable files left out)."""
    from sd3exp.images import list_images

    held, out = held_out_images(cfg), {}
    for c in cfg.concepts:
        got = sizes.get(c.id)
        if got is not None:
            names = [p.name for p in list_images(Path(c.path)) if p.name not in held.get(c.id, ())]
            if len(names) == len(got):
                out[c.id] = names
    return out


def plan_of(job: Job) -> Plan:
    sizes = concept_sizes(job.cfg)
    return replace(make_plan(job.cfg, sizes, held_out_images(job.cfg), concept_names(job.cfg, sizes)),
                   cache_dir=str(cache.cache_dir(job.cfg)))


def checked_plan(job: Job) -> Plan:
    """The plan, with every check compiling makes, but no file rendered (stage=plan)."""
    plan = plan_of(job)
    compile_inputs(job.cfg, plan, job.run_dir, job.config_hash, job.overrides)
    return plan


def build(job: Job) -> Tuple[Plan, Compiled]:
    plan = plan_of(job)
    return plan, compile_experiment(job.cfg, plan, job.run_dir, job.config_hash, job.overrides)


def files_of(job: Job, plan: Plan, compiled: Compiled) -> Dict[str, str]:
    files = dict(compiled.files)
    files[RunLayout.PLAN] = dumps_json(plan.to_dict())
    files[RunLayout.RESOLVED] = job.resolved_yaml
    return files


def compiled_files(job: Job) -> Dict[str, str]:
    """Every file `stage=compile` writes for `job`, by path in the run folder (text files only)."""
    return files_of(job, *build(job))


def named(task: DictConfig, hydra: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """`task` with its `name` as the command line gives it (conf/config.yaml reads the experiment
    choice from Hydra's runtime, which only a Hydra job provides), unless an override sets it."""
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}
    if "name" in keys:
        return task
    with open_dict(task):
        task.name = experiment_name(OmegaConf.select(hydra, "runtime.choices.experiment"))
    return task


def compose_job(conf_dir: Path, overrides: Sequence[str], run_dir: Path) -> Job:
    """Compose, validate and locate a job as `python -m sd3exp OVERRIDES stage=compile` would."""
    from sd3exp.migrate import migrated_config_dir

    register()
    try:
        with initialize_config_dir(config_dir=str(migrated_config_dir(conf_dir)), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "stage=compile"], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ComposeError(f"cannot compose {' '.join(overrides)}: {str(err).splitlines()[0]}") from err
    invocation = replace(Invocation.of(cfg.hydra), output_dir=run_dir)
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    return load(located(named(task, cfg.hydra, overrides), invocation), invocation)
