"""Semantic checks on a composed experiment; each error names field, value and fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from sd3exp import holdout, tag_shuffle
from sd3exp.buckets import MAX_MINIMUM_MEGAPIXELS, minimum_megapixels
from sd3exp.errors import ConfigError, ConfigErrors
from sd3exp.plan import bucket_rule
from sd3exp.schedule import SCHEDULES
from sd3exp.schema import ExperimentConfig
from sd3exp.stage_table import STAGES

MAX_REPEATS = 10_000  # passes per epoch; more is a typo, not a dataset
# SimpleTuner 4.10.1's optimizer names (helpers/training/optimizer_param.py, optimizer_choices, with the
# ones that need optional packages such as bitsandbytes): any other name is refused by its parser.
OPTIMIZERS = (
    "adamw_bf16", "adamw_schedulefree", "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan",
    "ao-adamfp8", "ao-adamw4bit", "ao-adamw8bit", "ao-adamwfp8", "bnb-adagrad", "bnb-adagrad8bit", "bnb-adam",
    "bnb-adam8bit", "bnb-adamw", "bnb-adamw-paged", "bnb-adamw8bit", "bnb-adamw8bit-paged", "bnb-ademamix",
    "bnb-ademamix-paged", "bnb-ademamix8bit", "bnb-ademamix8bit-paged", "bnb-lion", "bnb-lion-paged",
    "bnb-lion8bit", "bnb-lion8bit-paged", "muon", "optimi-adam", "optimi-adamw", "optimi-adan", "optimi-lion",
    "optimi-radam", "optimi-ranger", "optimi-sgd", "optimi-stableadamw", "prodigy", "sdnq-adafactor",
    "sdnq-adamw", "sdnq-adamw+no_quant", "sdnq-came", "sdnq-lion", "sdnq-muon", "sdnq-muon+quantized_matmul",
    "soap", "torch-adadelta", "torch-adafactor", "torch-adagrad", "torch-adam", "torch-adamax", "torch-adamw",
    "torch-asgd", "torch-nadam", "torch-radam", "torch-rmsprop", "torch-sgd", "torch-sparseadam",
)


def non_finite(value: Any, field: str = "") -> List[Tuple[str, float]]:
    """(dotted key, value) of every inf or nan float in `value` (a config dataclass, list or mapping)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(field, value)]
    if dataclasses.is_dataclass(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        return [found for i, v in enumerate(value) for found in non_finite(v, f"{field}[{i}]")]
    else:
        return []
    return [found for name, v in items for found in non_finite(v, f"{field}.{name}" if field else name)]


def check_finite(cfg: ExperimentConfig) -> None:
    """Every float is a number: inf and nan (`1e999` reads as inf) are refused naming their key."""
    for key, value in non_finite(cfg):
        raise ConfigError(key, value, "not a finite number", f"set {key} to a number (e.g. {key}=0.5), not inf or nan")


def _positive(field: str, value: float, fix: str, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(field, value, "must be > 0" if strict else "must be >= 0", fix)


def _choice(field: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(field, value, "not a known value", f"use one of {', '.join(choices)}")


def check_training(cfg: ExperimentConfig) -> None:
    t = cfg.training
    _positive("training.batch_size", t.batch_size, "use a batch size of 1 or more")
    _positive("training.gradient_accumulation", t.gradient_accumulation, "use 1 for no accumulation")
    _positive("training.num_processes", t.num_processes, "use 1 per GPU on the machine")
    _positive("training.num_machines", t.num_machines, "use 1 for a single machine")
    _positive("training.epochs", t.epochs, "use 0 to train by max_steps", strict=False)
    _positive("training.max_steps", t.max_steps, "use 0 to train by epochs", strict=False)
    if t.epochs and t.max_steps:
        raise ConfigError("training.max_steps", t.max_steps,
                          f"both epochs ({t.epochs}) and max_steps are set; SimpleTuner requires one of them to be 0",
                          "set training.max_steps=0 or training.epochs=0")
    if not t.epochs and not t.max_steps:
        raise ConfigError("training.epochs", t.epochs, "neither epochs nor max_steps is set",
                          "set training.epochs=N or training.max_steps=N")
    _choice("training.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16", "fp8"))
    _positive("optimizer.lr", cfg.optimizer.lr, "use a positive learning rate, e.g. 1e-4 (LoRA) or 1e-5 (full)")
    check_optimizer(cfg.optimizer.name)
    _choice("optimizer.clip", cfg.optimizer.clip, ("norm", "value"))


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=3)
        raise ConfigError("optimizer.name", name, "not an optimizer SimpleTuner 4.10.1 knows",
                          f"use {' or '.join(close) if close else 'one of ' + ', '.join(OPTIMIZERS)}"
                          " (or the optimizer group: optimizer=adamw / optimizer=torch_adamw)")


def check_schedule(cfg: ExperimentConfig) -> None:
    s = cfg.schedule
    _choice("schedule.name", s.name, SCHEDULES)
    if s.warmup_steps is not None and s.warmup_fraction is not None:
        raise ConfigError("schedule.warmup_fraction", s.warmup_fraction, "both warmup_steps and warmup_fraction are set",
                          "keep one of them")
    if s.warmup_steps is not None:
        _positive("schedule.warmup_steps", s.warmup_steps, "use 0 for no warmup", strict=False)
    if s.warmup_fraction is not None and not 0 <= s.warmup_fraction < 1:
        raise ConfigError("schedule.warmup_fraction", s.warmup_fraction, "must be in [0, 1)", "e.g. schedule.warmup_fraction=0.05 for 5%")
    if not 0 <= s.final_lr < cfg.optimizer.lr:
        raise ConfigError("schedule.final_lr", s.final_lr, f"must be >= 0 and below optimizer.lr={cfg.optimizer.lr}",
                          "use 0 to decay to zero")


def check_checkpointing(cfg: ExperimentConfig) -> None:
    ck = cfg.checkpointing
    set_ = [k for k in ("every_steps", "every_epochs", "round_to") if getattr(ck, k)]
    if len(set_) != 1:
        raise ConfigError("checkpointing", {k: getattr(ck, k) for k in ("every_steps", "every_epochs", "round_to")},
                          "exactly one of every_steps, every_epochs, round_to must be set",
                          "e.g. checkpointing.every_steps=500, or use checkpointing=round_epoch")
    _positive(f"checkpointing.{set_[0]}", getattr(ck, set_[0]), "use a positive interval")
    _positive("checkpointing.keep", ck.keep, "use 0 to keep every checkpoint", strict=False)
    if ck.round_to and not cfg.training.epochs:
        raise ConfigError("checkpointing.round_to", ck.round_to, "the round-to-epoch rule needs training.epochs",
                          "set training.epochs, or use checkpointing.every_steps")


def check_model(cfg: ExperimentConfig) -> None:
    _choice("model.type", cfg.model.type, ("full", "lora"))
    _choice("model.family", cfg.model.family, ("sd3",))
    if cfg.model.type == "lora":
        if cfg.lora.rank < 1:
            raise ConfigError("lora.rank", cfg.lora.rank, "must be >= 1", "e.g. lora.rank=16")
        _positive("lora.alpha", cfg.lora.alpha, "e.g. lora.alpha equal to the rank")
        _choice("lora.type", cfg.lora.type, ("standard", "lycoris"))
        _choice("lora.format", cfg.lora.format, ("diffusers", "comfyui"))
    check_resolution(cfg)
    _choice("trainer.config_backend", cfg.trainer.config_backend, ("json", "env"))
    _choice("trainer.cpu_shim", cfg.trainer.cpu_shim, ("auto", "never"))


def _size(field: str, value: Any, resolution_type: str) -> None:
    """A number > 0; whole pixels unless resolution_type is area (megapixels)."""
    fix = "e.g. 0.5 (megapixels)" if resolution_type == "area" else "e.g. 1024 (pixels)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, value, "not a number", fix)
    _positive(field, value, fix)
    if resolution_type != "area" and value != int(value):
        raise ConfigError(field, value, f"resolution_type {resolution_type} counts whole pixels", fix)


def check_resolution(cfg: ExperimentConfig) -> None:
    ds = cfg.dataset
    _choice("dataset.resolution_type", ds.resolution_type, ("pixel", "area", "pixel_area"))
    _size("dataset.resolution", ds.resolution, ds.resolution_type)
    if ds.minimum_image_size is None:
        return
    _size("dataset.minimum_image_size", ds.minimum_image_size, ds.resolution_type)
    megapixels = minimum_megapixels(bucket_rule(cfg))
    if ds.resolution_type != "pixel" and megapixels > MAX_MINIMUM_MEGAPIXELS:
        raise ConfigError("dataset.minimum_image_size", ds.minimum_image_size,
                          f"SimpleTuner refuses an area minimum above {MAX_MINIMUM_MEGAPIXELS} megapixels "
                          f"(this is {megapixels:g})", "at most 2236 with pixel_area, 5 with area (megapixels)")


def check_concepts(cfg: ExperimentConfig) -> None:
    if not cfg.concepts:
        raise ConfigError("concepts", [], "an experiment needs at least one concept",
                          "add a concept with id, path, trigger and repeats")
    for kind in ("id", "trigger"):
        seen: Dict[str, int] = {}
        for i, c in enumerate(cfg.concepts):
            value = getattr(c, kind)
            if value in seen:
                raise ConfigError(f"concepts[{i}].{kind}", value,
                                  f"the same {kind} as concepts[{seen[value]}]", f"give every concept its own {kind}")
            seen[value] = i
    for i, c in enumerate(cfg.concepts):
        if not c.id or not c.id.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"concepts[{i}].id", c.id, "must be letters, digits, - or _",
                              "use a short name such as 'fantasy'")
        if c.repeats < 1:
            raise ConfigError(f"concepts[{i}].repeats", c.repeats,
                              "must be >= 1 (passes per epoch: 1 = each image once)", f"concepts.{i}.repeats=1 for no repetition")
        if c.repeats > MAX_REPEATS:
            raise ConfigError(f"concepts[{i}].repeats", c.repeats, f"more than {MAX_REPEATS} passes per epoch",
                              "use the passes per epoch you mean (e.g. 10), and training.epochs for the length")
        check_trigger(c, i)
        if c.num_images is not None and c.num_images < 1:
            raise ConfigError(f"concepts[{i}].num_images", c.num_images, "must be >= 1", "declare the folder's image count")
        check_holdout(cfg, c, i)
        cap = c.captions
        _choice(f"concepts[{i}].captions.mode", cap.mode, ("native", "materialized"))
        _positive(f"concepts[{i}].captions.keep_tags", cap.keep_tags, "use 0 to shuffle every tag", strict=False)
        tag_shuffle.tag_separator(c, where=f"concepts[{i}]")
        tag_shuffle.native_shuffle_block(c, cfg.seed, where=f"concepts[{i}]")


def check_holdout(cfg: ExperimentConfig, c: Any, i: int) -> None:
    """concepts[].holdout: a count; the held-out loss needs SimpleTuner's local metrics to be read."""
    _positive(f"concepts[{i}].holdout", c.holdout, "use 0 to train on every image", strict=False)
    if c.num_images is not None and not Path(c.path).is_dir():
        holdout.check_count(c, i, c.num_images)
    if c.holdout and cfg.trainer.report_to == "none":
        raise ConfigError("trainer.report_to", cfg.trainer.report_to,
                          f"concepts[{i}].holdout={c.holdout} asks for a held-out loss, which SimpleTuner logs only "
                          "to a reporter (training/training_metrics.jsonl with simpletuner)",
                          "set trainer.report_to=simpletuner")
    every = cfg.validation.loss_every_steps
    if c.holdout and every is not None:
        _positive("validation.loss_every_steps", every, "e.g. the checkpoint interval, or null for that default")


def check_captioner(cfg: ExperimentConfig) -> None:
    c = cfg.captioner
    _positive("captioner.workers", c.workers, "e.g. captioner.workers=4")
    _positive("captioner.timeout_s", c.timeout_s, "e.g. captioner.timeout_s=120")
    _positive("captioner.retries", c.retries, "use 0 for no retries", strict=False)
    _positive("captioner.backoff_s", c.backoff_s, "use 0 to retry at once", strict=False)
    _positive("captioner.max_new_tokens", c.max_new_tokens, "e.g. captioner.max_new_tokens=300")
    _choice("captioner.prefer", c.prefer, ("user", "model"))
    if c.max_length is not None:
        _positive("captioner.max_length", c.max_length, "e.g. captioner.max_length=75, or null for no limit")


def check_trigger(c: Any, i: int) -> None:
    """A trigger is one non-empty tag that the caption shuffle keeps whole."""
    if not c.trigger.strip():
        raise ConfigError(f"concepts[{i}].trigger", c.trigger, "empty: captions would not be tied to the concept",
                          "set the concept's trigger word, e.g. k4s4")
    sep = tag_shuffle.tag_separator(c, where=f"concepts[{i}]")
    pieces = len(tag_shuffle.split_tags(c.trigger, sep))
    if c.captions.shuffle and pieces > max(1, c.captions.keep_tags):
        raise ConfigError(f"concepts[{i}].trigger", c.trigger,
                          f"the tag separator {sep!r} splits it into {pieces} tags, and the caption shuffle moves "
                          f"all but the first keep_tags={c.captions.keep_tags}",
                          f"use a trigger without {sep!r}, or set concepts[{i}].captions.keep_tags={pieces}")


def check_dataset_paths(cfg: ExperimentConfig) -> None:
    """The concept folders exist (for the stages that read them)."""
    for i, c in enumerate(cfg.concepts):
        if not Path(c.path).is_dir():
            raise ConfigError(f"concepts[{i}].path", c.path, "folder not found",
                              "point it at a folder of images with .txt captions")


def check_eval(cfg: ExperimentConfig) -> None:
    """The backend's name (a typo would otherwise render with diffusers), the link mode and the
    evaluation axes (a sampler or scheduler diffusers has no equivalent for)."""
    from sd3exp.evaluate import axes

    _choice("eval.backend", cfg.eval.backend, ("diffusers", "comfyui", "none"))
    _choice("eval.link_mode", cfg.eval.link_mode, ("symlink", "extra_paths"))
    if STAGES[cfg.stage].evaluates and cfg.eval.backend != "none":  # refused before compile rewrites the run folder
        from sd3exp.evaluate.stage import check_settings

        check_settings(cfg)
    values = axes.axis_values(cfg.eval)
    if cfg.eval.backend == "diffusers":
        axes.check_diffusers(values)


CHECKS: List[Callable[[ExperimentConfig], None]] = [
    check_model, check_training, check_schedule, check_checkpointing, check_concepts, check_captioner, check_eval,
]


def validate(cfg: ExperimentConfig, need_data: bool = False) -> None:
    """Every check; independent problems are reported together (as torchtune's `tune validate`)."""
    check_finite(cfg)  # first and alone: an inf or nan would mislead the checks that compare numbers
    _choice("stage", cfg.stage, tuple(STAGES))  # first and alone too: the other checks look the stage up
    errors: List[ConfigError] = []
    for check in [*CHECKS, *([check_dataset_paths] if need_data else [])]:
        try:
            check(cfg)
        except ConfigError as err:
            errors.append(err)
    if len(errors) > 1:
        raise ConfigErrors(errors)
    if errors:
        raise errors[0]
