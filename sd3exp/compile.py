"""Compile an experiment into SimpleTuner's config.env, config.json and multibackend.json.

One ordered list of trainer arguments (`Arg`) is rendered twice: as config.env
lines (mapped variables, the rest in TRAINER_EXTRA_ARGS) and as config.json.
Paths inside the run folder are written relative to it, because SimpleTuner
runs with the run folder as its working directory (`cd <run> && simpletuner train`); the
prepared image folders and the shared caches (sd3exp/cache.py) are absolute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from sd3exp import __version__, envfile, holdout, tag_shuffle
from sd3exp.errors import ConfigError, UnsafeValueError
from sd3exp.io import dumps_json
from sd3exp.layout import RunLayout
from sd3exp.plan import Plan
from sd3exp.project import TEMPLATES
from sd3exp.runfolder import INVOCATION_KEYS
from sd3exp.schema import ConceptConfig, ExperimentConfig

if TYPE_CHECKING:
    import jinja2

Scalar = Union[str, int, float, bool]
TEXT_EMBEDS_ID = "text-embeds"


@dataclass(frozen=True)
class Arg:
    """One SimpleTuner argument, the YAML field it comes from, and its config.env variable."""

    name: str
    value: Scalar
    field: str
    env: Optional[str] = None

    def token(self) -> str:
        if self.value is True:
            return f"--{self.name}"
        value = "false" if self.value is False else self.value
        return f"--{self.name}={value}"


@dataclass(frozen=True)
class Compiled:
    """The compiled files, by path relative to the run folder."""

    files: Dict[str, str]


def whole(value: Scalar) -> Scalar:
    """1024.0 -> 1024: SimpleTuner's pixel_area conversion accepts only a whole resolution."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def run_relative(path: Union[str, Path], run_dir: Path) -> str:
    """`path` relative to the run folder when inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def _model_args(cfg: ExperimentConfig) -> List[Arg]:
    m = cfg.model
    args = [Arg("model_family", m.family, "model.family", "MODEL_FAMILY"),
            Arg("model_type", m.type, "model.type", "MODEL_TYPE"),
            Arg("pretrained_model_name_or_path", m.path, "model.path", "MODEL_NAME"),
            Arg("base_model_precision", m.base_precision, "model.base_precision", "BASE_MODEL_PRECISION")]
    if m.flavour:
        args.append(Arg("model_flavour", m.flavour, "model.flavour"))
    if m.type == "lora":
        lo = cfg.lora
        args += [Arg("lora_type", lo.type, "lora.type", "LORA_TYPE"), Arg("lora_rank", lo.rank, "lora.rank"),
                 Arg("lora_alpha", lo.alpha, "lora.alpha"), Arg("lora_format", lo.format, "lora.format")]
    return args


def _schedule_args(cfg: ExperimentConfig, plan: Plan) -> List[Arg]:
    s = plan.schedule
    args = [Arg("learning_rate", cfg.optimizer.lr, "optimizer.lr", "LEARNING_RATE"),
            Arg("lr_scheduler", s["scheduler"], "schedule.name", "LR_SCHEDULE"),
            Arg("lr_warmup_steps", s["warmup_steps"], "schedule.warmup_steps", "LR_WARMUP_STEPS"),
            Arg("lr_end", s["lr_end"], "schedule.final_lr", "LR_END")]
    if s["scheduler"] == "polynomial":
        args.append(Arg("lr_power", s["power"], "schedule.power"))
    return args + [Arg("optimizer", cfg.optimizer.name, "optimizer.name", "OPTIMIZER"),
                   Arg("max_grad_norm", cfg.optimizer.max_grad_norm, "optimizer.max_grad_norm"),
                   Arg("grad_clip_method", cfg.optimizer.clip, "optimizer.clip")]


def _length_args(cfg: ExperimentConfig, plan: Plan) -> List[Arg]:
    by_steps = plan.stop_rule == "max_steps"
    ck = cfg.checkpointing
    args = [Arg("max_train_steps", plan.max_train_steps if by_steps else 0, "training.max_steps", "MAX_NUM_STEPS"),
            Arg("num_train_epochs", 0 if by_steps else cfg.training.epochs, "training.epochs", "NUM_EPOCHS")]
    if plan.checkpoint_interval_steps:
        field = "checkpointing.round_to" if ck.round_to else "checkpointing.every_steps"
        args.append(Arg("checkpoint_step_interval", plan.checkpoint_interval_steps, field, "CHECKPOINTING_STEPS"))
    elif plan.checkpoint_interval_epochs is not None:  # validate.py: exactly one interval is set
        args.append(Arg("checkpoint_epoch_interval", plan.checkpoint_interval_epochs, "checkpointing.every_epochs",
                        "CHECKPOINT_EPOCH_INTERVAL"))
    return args + [Arg("checkpoints_total_limit", ck.keep, "checkpointing.keep", "CHECKPOINTING_LIMIT"),
                   Arg("checkpointing_use_tempdir", True, "checkpointing"),
                   Arg("resume_from_checkpoint", "latest", "trainer.new_run", "RESUME_CHECKPOINT")]


def _batch_args(cfg: ExperimentConfig) -> List[Arg]:
    t, ds = cfg.training, cfg.dataset
    args = [Arg("train_batch_size", t.batch_size, "training.batch_size", "TRAIN_BATCH_SIZE"),
            Arg("gradient_accumulation_steps", t.gradient_accumulation, "training.gradient_accumulation",
                "GRADIENT_ACCUMULATION_STEPS"),
            Arg("gradient_checkpointing", t.gradient_checkpointing, "training.gradient_checkpointing"),
            Arg("mixed_precision", t.mixed_precision, "training.mixed_precision", "MIXED_PRECISION"),
            Arg("seed", cfg.seed, "seed", "TRAINING_SEED"),
            Arg("resolution", whole(ds.resolution), "dataset.resolution", "RESOLUTION"),
            Arg("resolution_type", ds.resolution_type, "dataset.resolution_type", "RESOLUTION_TYPE"),
            Arg("caption_dropout_probability", ds.caption_dropout, "dataset.caption_dropout",
                "CAPTION_DROPOUT_PROBABILITY")]
    if ds.minimum_image_size is not None:
        args.append(Arg("minimum_image_size", whole(ds.minimum_image_size), "dataset.minimum_image_size",
                        "MINIMUM_RESOLUTION"))
    if ds.allow_oversubscription:
        args.append(Arg("allow_dataset_oversubscription", True, "dataset.allow_oversubscription"))
    return args


def _scale_args(cfg: ExperimentConfig) -> List[Arg]:
    t = cfg.training
    args = [Arg("num_processes", t.num_processes, "training.num_processes", "TRAINING_NUM_PROCESSES"),
            Arg("num_machines", t.num_machines, "training.num_machines", "TRAINING_NUM_MACHINES")]
    if t.accelerate_config:
        args.append(Arg("accelerate_config", str(Path(t.accelerate_config).resolve()), "training.accelerate_config",
                        "ACCELERATE_CONFIG_PATH"))
    return args


def _misc_args(cfg: ExperimentConfig, run_dir: Path) -> List[Arg]:
    v = cfg.validation
    args = [Arg("output_dir", run_relative(cfg.paths.training_dir, run_dir), "paths.training_dir", "OUTPUT_DIR"),
            Arg("data_backend_config", RunLayout.MULTIBACKEND, "concepts", "DATALOADER_CONFIG"),
            Arg("tracker_project_name", "sd3exp", "name", "TRACKER_PROJECT_NAME"),
            Arg("tracker_run_name", cfg.name, "name", "TRACKER_RUN_NAME"),
            Arg("report_to", cfg.trainer.report_to, "trainer.report_to")]
    if v.enabled:
        args += [Arg("validation_prompt", v.prompt, "validation.prompt", "VALIDATION_PROMPT"),
                 Arg("validation_step_interval", v.every_steps, "validation.every_steps", "VALIDATION_STEPS")]
    elif not held_out_count(cfg):
        args.append(Arg("validation_disable", True, "validation.enabled"))
    else:  # --validation_disable would stop the held-out loss too (trainer.py init_validations): no images instead
        args += [Arg("validation_disable_unconditional", True, "validation.enabled"),
                 Arg("disable_benchmark", True, "validation.enabled", "DISABLE_BENCHMARK")]
    return args


def held_out_count(cfg: ExperimentConfig) -> int:
    return sum(c.holdout for c in cfg.concepts)


def _held_out_args(cfg: ExperimentConfig, plan: Plan) -> List[Arg]:
    """SimpleTuner's validation loss on the eval datasets of held-out images (loss/val/<id>.holdout in its
    metrics), by default at every checkpoint; num_eval_images (a batch count, batch 1) covers them all."""
    count = held_out_count(cfg)
    if not count:
        return []
    every = cfg.validation.loss_every_steps
    field = "validation.loss_every_steps"
    if every is None:
        every = plan.checkpoint_interval_steps or (plan.checkpoint_interval_epochs or 1) * plan.steps_per_epoch
        field = "checkpointing"
    return [Arg("eval_steps_interval", every, field), Arg("num_eval_images", count, "concepts[].holdout")]


def trainer_args(cfg: ExperimentConfig, plan: Plan, run_dir: Path) -> List[Arg]:
    """Every SimpleTuner argument of the experiment, in a stable order."""
    return (_model_args(cfg) + _schedule_args(cfg, plan) + _length_args(cfg, plan) + _batch_args(cfg)
            + _scale_args(cfg) + _misc_args(cfg, run_dir) + _held_out_args(cfg, plan))


def dataset_entry(c: ConceptConfig, cfg: ExperimentConfig, cache: Path, run_dir: Path) -> dict:
    ds = cfg.dataset
    entry: Dict[str, Any] = {
        "id": c.id, "type": "local",
        # absolute: SimpleTuner names a latent <cache_dir_vae>/<image folder minus instance_data_dir>/<name>,
        # so a relative one would put the run folder's path into the shared cache's file names
        "instance_data_dir": (Path(ds.prepared_dir) / c.id).resolve().as_posix(),
        "caption_strategy": c.caption_strategy, "metadata_backend": "discovery",
        "resolution": whole(ds.resolution), "resolution_type": ds.resolution_type,
        "crop": ds.crop, "crop_style": ds.crop_style, "crop_aspect": ds.crop_aspect,
        "repeats": tag_shuffle.simpletuner_repeats(c), "probability": c.probability,
        "cache_dir_vae": run_relative(cache / "vae" / c.id, run_dir),
    }
    if ds.minimum_image_size is not None:
        entry["minimum_image_size"] = whole(ds.minimum_image_size)
    shuffle = tag_shuffle.native_shuffle_block(c, cfg.seed)
    if shuffle:
        entry["caption_shuffle"] = shuffle
    return entry


def held_out_entry(c: ConceptConfig, cfg: ExperimentConfig, cache: Path, run_dir: Path) -> dict:
    """The concept's held-out images (prepared into <id>.holdout/) as an eval dataset: each image once,
    its caption as is, latents in a VAE cache folder of their own."""
    entry = dataset_entry(c, cfg, cache, run_dir)
    name = holdout.folder_name(c.id)
    for key in ("caption_shuffle", "probability"):
        entry.pop(key, None)
    entry.update({"id": name, "dataset_type": "eval", "repeats": 0,
                  "instance_data_dir": (Path(cfg.dataset.prepared_dir) / name).resolve().as_posix(),
                  "cache_dir_vae": run_relative(cache / "vae" / name, run_dir)})
    return entry


def data_backends(cfg: ExperimentConfig, plan: Plan, run_dir: Path) -> List[dict]:
    """The multibackend.json list: one image dataset per concept + the text-embed cache, both
    in the dataset's shared cache folder (plan.cache_dir, sd3exp/cache.py)."""
    cache = plan.cache_folder
    entries = [dataset_entry(c, cfg, cache, run_dir) for c in cfg.concepts]
    entries += [held_out_entry(c, cfg, cache, run_dir) for c in cfg.concepts if c.holdout]
    entries.append({"id": TEXT_EMBEDS_ID, "type": "local", "dataset_type": "text_embeds", "default": True,
                    "cache_dir": run_relative(cache / "text", run_dir)})
    return entries


# What `simpletuner train` itself reads from config.env (cli/train.py: the accelerate launch) whatever the backend
LAUNCHER_ENV = ("MIXED_PRECISION", "TRAINING_NUM_PROCESSES", "TRAINING_NUM_MACHINES", "ACCELERATE_CONFIG_PATH")


def json_backend_lines(args: Sequence[Arg]) -> Tuple[List[tuple], bool]:
    """config.env lines beside config.json: every argument when config.env can carry them all (True),
    else only the launcher's variables (False); SimpleTuner's json backend ignores the rest."""
    try:
        return env_lines(args), True
    except UnsafeValueError:
        return [(a.env, envfile.encode(a.field, a.value)) for a in args if a.env in LAUNCHER_ENV], False


def env_lines(args: Sequence[Arg]) -> List[tuple]:
    """(KEY, encoded value) lines; unmapped arguments go into TRAINER_EXTRA_ARGS."""
    lines = [(a.env, envfile.encode(a.field, a.value, flag=isinstance(a.value, bool))) for a in args if a.env]
    extra = [a for a in args if not a.env]
    for a in extra:
        if isinstance(a.value, str):
            envfile.check_text(a.field, a.value)
            if " " in a.value:
                raise UnsafeValueError(a.field, a.value, "TRAINER_EXTRA_ARGS is split on whitespace",
                                       "use a value without spaces, or trainer.config_backend=json")
    tokens = " ".join(a.token() for a in extra)
    return lines + ([("TRAINER_EXTRA_ARGS", envfile.encode("trainer.extra_args", tokens))] if tokens else [])


def user_extra_args(cfg: ExperimentConfig) -> List[Arg]:
    """trainer.extra_args (`--name=value` or `--flag`) as Args, checked for safety."""
    out = []
    for i, token in enumerate(cfg.trainer.extra_args):
        field = f"trainer.extra_args[{i}]"
        if not token.startswith("--") or " " in token:
            raise UnsafeValueError(field, token, "each extra argument must be one `--name=value` or `--flag` token",
                                   "split it into separate list items, without spaces")
        name, sep, value = token[2:].partition("=")
        out.append(Arg(name, value if sep else True, field))
    return out


def check_extra_args(args: Sequence[Arg]) -> None:
    """Refuse a trainer.extra_args item that repeats an argument sd3exp compiles from an experiment field."""
    compiled = {a.name.replace("-", "_"): a for a in args if not a.field.startswith("trainer.extra_args")}
    for a in args:
        first = compiled.get(a.name.replace("-", "_"))
        if first and a.field.startswith("trainer.extra_args"):
            raise ConfigError(a.field, a.token(), f"sd3exp already passes --{first.name} (from {first.field})",
                              f"set {first.field} in the experiment instead, and drop this extra argument")


def relocatable(data: Any, folders: Dict[str, str]) -> Any:
    """`data` with every path inside one of `folders` (absolute folder -> placeholder) written relative to it."""
    if isinstance(data, dict):
        return {k: relocatable(v, folders) for k, v in data.items()}
    if isinstance(data, list):
        return [relocatable(v, folders) for v in data]
    if isinstance(data, str):
        for folder, placeholder in folders.items():
            if data == folder or data.startswith(folder.rstrip("/") + "/"):
                return placeholder + data[len(folder.rstrip("/")):]
    return data


def config_hash(resolved: dict) -> str:
    """sha256 of the resolved training settings (INVOCATION_KEYS removed; paths inside the run folder or
    the project checkout written relative to them, so moving either keeps a run's identity)."""
    data = json.loads(json.dumps(resolved, sort_keys=True, default=str))
    paths = data.get("paths") or {}
    folders = {str(paths[k]): f"${{paths.{k}}}" for k in ("run_dir", "root_dir") if isinstance(paths.get(k), str)
               and paths[k].startswith("/")}
    data = relocatable(data, dict(sorted(folders.items(), key=lambda kv: -len(kv[0]))))
    for key in INVOCATION_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def _environment() -> jinja2.Environment:
    import jinja2  # only where files are rendered (stage=plan checks without it)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["json"] = lambda data: dumps_json(data).rstrip("\n")
    return env


def compile_inputs(cfg: ExperimentConfig, plan: Plan, run_dir: Path, config_sha: str,
                   overrides: str) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Every compiled file's template and what it is rendered with, by path; every value checked,
    nothing rendered."""
    args = trainer_args(cfg, plan, run_dir) + user_extra_args(cfg)
    check_extra_args(args)
    json_backend = cfg.trainer.config_backend == "json"
    header: Dict[str, Any] = {"experiment": cfg.name, "overrides": overrides or "(none)", "version": __version__,
              "config_hash": config_sha, "backend": cfg.trainer.config_backend}
    if header["overrides"] != " ".join(header["overrides"].split()) or "\n" in overrides:
        raise UnsafeValueError("overrides", overrides, "cannot be recorded in a config.env comment", "simplify them")
    lines, header["mirror"] = json_backend_lines(args) if json_backend else (env_lines(args), True)
    return {
        RunLayout.CONFIG_ENV: ("config.env.j2", {"header": header, "lines": lines}),
        RunLayout.MULTIBACKEND: ("multibackend.json.j2", {"backends": data_backends(cfg, plan, run_dir)}),
        RunLayout.CONFIG_JSON: ("config.json.j2", {"config": {a.name: a.value for a in args}}),
    }


def compile_experiment(cfg: ExperimentConfig, plan: Plan, run_dir: Path, config_sha: str,
                       overrides: str) -> Compiled:
    """Render every compiled file; nothing is written here."""
    env = _environment()
    inputs = compile_inputs(cfg, plan, run_dir, config_sha, overrides)
    return Compiled({path: env.get_template(name).render(**context) for path, (name, context) in inputs.items()})

