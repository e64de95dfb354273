"""Step planner: what SimpleTuner 4.10.1 will actually run, and the naive figure.

Per concept and aspect bucket: samples = images x passes. A bucket short of one
effective batch (batch x gradient accumulation x processes) makes SimpleTuner abort,
so the plan refuses it, unless dataset.allow_oversubscription pads it (SimpleTuner
repeats 0 only); it is pruned silently instead only when below one batch with
dataset.minimum_image_size set (sd3exp/buckets.py, bucket_fate). Each other bucket
gives ceil(samples / batch) batches (short batches are filled). With P processes each
bucket's images are split across ranks first and the main rank's share (ceil(n / P))
counts. Batches of all concepts add up; steps per epoch = ceil(batches / gradient_accumulation).
`repeats` in an experiment is the number of passes per epoch (kohya's meaning):
SimpleTuner's repeats = passes - 1.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sd3exp import estimate, tag_shuffle
from sd3exp import schedule as lr_schedule
from sd3exp.buckets import BucketRule, BucketTrainer, bucket_fate, bucket_of, repeats_needed
from sd3exp.errors import ConfigError
from sd3exp.project import CONF_DIR
from sd3exp.schema import ConceptConfig, ExperimentConfig

Size = Tuple[int, int]


@dataclass
class ConceptPlan:
    id: str
    images: int
    image_source: str  # "disk" or "declared"
    passes: int
    simpletuner_repeats: int
    buckets: Dict[str, int]
    pruned_buckets: Dict[str, int]
    skipped_images: int
    samples_per_epoch: int
    batches_per_epoch: int
    held_out: List[str] = field(default_factory=list)  # images not trained on: the eval dataset's (holdout)
    short_buckets: Dict[str, int] = field(default_factory=dict)  # below one effective batch: SimpleTuner aborts
    padded_buckets: Dict[str, int] = field(default_factory=dict)  # the same, padded by allow_oversubscription


@dataclass
class Plan:
    experiment: str
    model_type: str
    batch_size: int
    gradient_accumulation: int
    num_processes: int
    effective_batch: int
    concepts: List[ConceptPlan]
    steps_per_epoch: int
    epochs: int
    max_train_steps: int
    stop_rule: str  # "epochs" or "max_steps": which of NUM_EPOCHS / MAX_NUM_STEPS is set
    checkpoint_interval_steps: Optional[int]
    checkpoint_interval_epochs: Optional[int]
    checkpoint_steps: List[int]
    checkpoints_kept: List[int]
    naive_steps_per_epoch: float
    naive_max_train_steps: float
    lr: float
    schedule: Dict[str, Any]
    lr_curve: List[Tuple[int, float]]
    warnings: List[str] = field(default_factory=list)
    cache_dir: Optional[str] = None  # the shared text-embed/VAE cache (sd3exp/cache.py)
    estimate: Optional[dict] = None  # GPU memory and disk in GiB (sd3exp/estimate.py); None: model shape unknown

    @property
    def cache_folder(self) -> Path:
        """cache_dir as a path; a job's plan has one (sd3exp/job.py)."""
        if self.cache_dir is None:
            raise ValueError("the plan has no cache_dir")
        return Path(self.cache_dir)

    def to_dict(self) -> dict:
        """The plan as plan.json records it (a concept's held_out and bucket notes only when not empty)."""
        data = asdict(self)
        for c in data["concepts"]:
            for key in ("held_out", "short_buckets", "padded_buckets"):
                if not c[key]:
                    del c[key]
        return data


def bucket_rule(cfg: ExperimentConfig) -> BucketRule:
    ds = cfg.dataset
    return BucketRule(ds.resolution, ds.resolution_type, ds.crop, ds.crop_aspect, ds.minimum_image_size)


def bucket_counts(sizes: Sequence[Size], rule: BucketRule) -> Tuple[Counter, int]:
    """Images per bucket key, and how many images SimpleTuner would skip."""
    keys = [bucket_of(s, rule) for s in sizes]
    counts = Counter(f"{k:.2f}" for k in keys if k is not None)
    return counts, sum(k is None for k in keys)


def bucket_trainer(cfg: ExperimentConfig) -> BucketTrainer:
    t = cfg.training
    return BucketTrainer(t.batch_size, t.num_processes, t.gradient_accumulation,
                         cfg.dataset.minimum_image_size is not None, cfg.dataset.allow_oversubscription)


def plan_concept(c: ConceptConfig, sizes: Optional[Sequence[Size]], rule: BucketRule,
                 trainer: BucketTrainer, held_out: Sequence[str] = ()) -> ConceptPlan:
    """Per bucket, as SimpleTuner's main process counts it (buckets.bucket_fate): its share of the
    bucket's samples, ceil(samples / batch) batches. `sizes` are the trained images' (held-out ones
    excluded); a declared count loses c.holdout. Materialized captions put `repeats` copies on disk."""
    if sizes is None:
        counts, skipped, source = Counter({"1.00": (c.num_images or 0) - c.holdout}), 0, "declared"
    else:
        (counts, skipped), source = bucket_counts(sizes, rule), "disk"
    st_repeats = tag_shuffle.simpletuner_repeats(c)
    copies = 1 if st_repeats or not tag_shuffle.materialized(c) else c.repeats
    by_fate: Dict[str, Dict[str, int]] = {"kept": {}, "padded": {}, "pruned": {}, "aborts": {}}
    batches = 0
    for key in sorted(counts, key=float):
        fate, samples = bucket_fate(counts[key] * copies, st_repeats, trainer)
        by_fate[fate][key] = counts[key]
        batches += math.ceil(samples / trainer.batch_size)
    kept = {**by_fate["kept"], **by_fate["padded"]}
    images = sum(counts.values()) + skipped
    return ConceptPlan(c.id, images, source, c.repeats, st_repeats, dict(sorted(kept.items(), key=lambda kv: float(kv[0]))),
                       by_fate["pruned"], skipped, sum(kept.values()) * c.repeats, batches, list(held_out),
                       by_fate["aborts"], by_fate["padded"])


def _checkpoints(cfg: ExperimentConfig, steps_per_epoch: int, epochs: int) -> Tuple[Optional[int], Optional[int]]:
    ck = cfg.checkpointing
    if ck.round_to:
        return math.ceil(steps_per_epoch / ck.round_to) * ck.round_to, None
    if ck.every_epochs:
        return None, ck.every_epochs
    return ck.every_steps, None


def _max_steps(cfg: ExperimentConfig, steps_per_epoch: int, interval: Optional[int]) -> Tuple[int, str]:
    t = cfg.training
    if t.max_steps:
        return t.max_steps, "max_steps"
    if cfg.checkpointing.round_to and interval:
        return t.epochs * interval, "max_steps"
    return math.ceil(t.epochs * steps_per_epoch), "epochs"


def checkpoint_steps(max_steps: int, every_steps: Optional[int], every_epochs: Optional[int],
                     steps_per_epoch: int) -> List[int]:
    """Global steps at which SimpleTuner writes `checkpoint-N` folders."""
    stride = every_steps if every_steps else (every_epochs or 0) * steps_per_epoch
    return list(range(stride, max_steps + 1, stride)) if stride > 0 else []


def bucket_images(sizes: Sequence[Size], names: Sequence[str], rule: BucketRule, key: str) -> List[str]:
    return [n for n, size in zip(names, sizes) if (b := bucket_of(size, rule)) is not None and f"{b:.2f}" == key]


def short_bucket_error(cfg: ExperimentConfig, i: int, cp: ConceptPlan, key: str, images: Sequence[str]) -> ConfigError:
    """SimpleTuner's 'zero usable batches' abort, said before training, with the fixes that work."""
    t, trainer, n = cfg.training, bucket_trainer(cfg), cp.short_buckets[key]
    named = f" ({', '.join(images[:10])}{', ...' if len(images) > 10 else ''})" if images else ""
    need = repeats_needed(n, trainer)
    fixes = [f"concepts.{i}.repeats={need} (each bucket then has one effective batch)",
             f"remove the {n} image(s){named} from {cfg.concepts[i].path} or crop them to another bucket's aspect",
             "dataset.crop=true (one square bucket)"]
    if cp.simpletuner_repeats == 0:
        fixes.append("dataset.allow_oversubscription=true (SimpleTuner repeats this bucket's images to fill it)")
    else:
        fixes.append(f"dataset.allow_oversubscription=true with concepts.{i}.repeats=1 (SimpleTuner pads only "
                     "datasets without repeats)")
    return ConfigError(
        f"concepts[{i}].repeats", cp.passes,
        f"bucket {key} of concept '{cp.id}' has {n} image(s){named} x {cp.passes} pass(es) = {n * cp.passes} "
        f"samples, fewer than one effective batch (batch_size {t.batch_size} x gradient_accumulation "
        f"{t.gradient_accumulation} x num_processes {t.num_processes} = {trainer.effective_batch}): SimpleTuner "
        "4.10.1 aborts with 'Dataset configuration will produce zero usable batches'",
        "; or ".join(fixes))


# The stages a short bucket is refused at: those that plan, compile or train a run. Captioning, reviewing and
# auditing a dataset that is still being put together, and evaluating a finished run, only warn (_warnings).
TRAINING_STAGES = ("plan", "compile", "prepare", "train", "all")


def zero_batch_check(cfg: ExperimentConfig, concepts: List[ConceptPlan],
                     sizes: Mapping[str, Optional[Sequence[Size]]],
                     names: Mapping[str, Sequence[str]]) -> None:
    """Refuse what SimpleTuner would abort on: every image skipped, no bucket left, or a bucket short of
    one effective batch (named with its images where `names` lists them beside `sizes`)."""
    t = cfg.training
    for i, cp in enumerate(concepts):
        if not cp.buckets and cp.skipped_images == cp.images:
            raise ConfigError("dataset.minimum_image_size", cfg.dataset.minimum_image_size,
                              f"all {cp.images} images of concept '{cp.id}' are below it, so SimpleTuner skips them",
                              "lower dataset.minimum_image_size, or leave it unset (null)")
        for key in cp.short_buckets if cfg.stage in TRAINING_STAGES else ():
            found, listed = sizes.get(cp.id), names.get(cp.id)
            images = bucket_images(found, listed, bucket_rule(cfg), key) if found and listed else []
            raise short_bucket_error(cfg, i, cp, key, images)
        if not cp.buckets:
            raise ConfigError(
                f"concepts[{i}].repeats", cp.passes,
                f"concept '{cp.id}' gives zero usable batches: every aspect bucket has fewer than "
                f"batch_size={t.batch_size} samples per epoch ({cp.images} images, buckets "
                f"{dict(sorted(cp.pruned_buckets.items()))})",
                "raise repeats, lower training.batch_size, or crop to one square bucket (dataset.crop=true)",
            )


MAX_CHECKPOINTS = 10_000  # planned checkpoint folders
MAX_COPIES = 1_000_000  # image files a materialized concept may place


def checkpoint_count(max_steps: int, every_steps: Optional[int], every_epochs: Optional[int],
                     steps_per_epoch: int) -> int:
    """How many checkpoints checkpoint_steps() lists, without listing them."""
    stride = every_steps if every_steps else (every_epochs or 0) * steps_per_epoch
    return max_steps // stride if stride > 0 else 0


def limits_check(cfg: ExperimentConfig, concepts: List[ConceptPlan], count: int) -> None:
    """Refuse plans no disk holds: too many checkpoints (`count`) or materialized copies; run before
    any list of steps is built, so a typo in training.epochs is refused rather than exhausting memory."""
    if count > MAX_CHECKPOINTS:
        ck = cfg.checkpointing
        key = next(k for k in ("every_steps", "every_epochs", "round_to") if getattr(ck, k))
        raise ConfigError(f"checkpointing.{key}", getattr(ck, key),
                          f"plans {count} checkpoints (more than {MAX_CHECKPOINTS})",
                          "save less often, or check training.epochs / max_steps and concepts[].repeats")
    for i, (c, cp) in enumerate(zip(cfg.concepts, concepts)):
        if tag_shuffle.materialized(c) and cp.images * c.repeats > MAX_COPIES:
            raise ConfigError(f"concepts[{i}].repeats", c.repeats,
                              f"captions.mode=materialized would place {cp.images * c.repeats} image files "
                              f"(more than {MAX_COPIES})", f"use concepts[{i}].captions.mode=native, or fewer repeats")


def make_plan(cfg: ExperimentConfig, sizes: Mapping[str, Optional[Sequence[Size]]],
              held_out: Optional[Mapping[str, Sequence[str]]] = None,
              names: Optional[Mapping[str, Sequence[str]]] = None) -> Plan:
    """The step plan; `sizes` maps concept id to the trained images' sizes on disk (None: use
    num_images); `held_out` to the names of the images held out for the validation loss; `names`
    to the trained images' file names, in the order of `sizes` (for messages)."""
    t = cfg.training
    rule = bucket_rule(cfg)
    held_out = held_out or {}
    concepts = [plan_concept(c, sizes.get(c.id), rule, bucket_trainer(cfg), held_out.get(c.id, ()))
                for c in cfg.concepts]
    zero_batch_check(cfg, concepts, sizes, names or {})
    spe = max(1, math.ceil(sum(c.batches_per_epoch for c in concepts) / t.gradient_accumulation))
    every_steps, every_epochs = _checkpoints(cfg, spe, t.epochs)
    max_steps, stop_rule = _max_steps(cfg, spe, every_steps)
    epochs = math.ceil(max_steps / spe)
    limits_check(cfg, concepts, checkpoint_count(max_steps, every_steps, every_epochs, spe))
    ckpts = checkpoint_steps(max_steps, every_steps, every_epochs, spe)
    naive = sum(c.images * c.passes for c in concepts) / t.batch_size
    sched = lr_schedule.to_trainer(cfg.schedule, cfg.optimizer.lr, max_steps)
    kept = ckpts[-cfg.checkpointing.keep:] if cfg.checkpointing.keep else ckpts
    est = estimate.estimate(cfg, len(kept))
    warnings = _warnings(cfg, concepts, ckpts) + estimate.memory_warnings(cfg, CONF_DIR, len(kept))
    return Plan(
        experiment=cfg.name, model_type=cfg.model.type, batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation, num_processes=t.num_processes,
        effective_batch=t.batch_size * t.gradient_accumulation * t.num_processes,
        concepts=concepts, steps_per_epoch=spe, epochs=epochs, max_train_steps=max_steps,
        stop_rule=stop_rule, checkpoint_interval_steps=every_steps,
        checkpoint_interval_epochs=every_epochs, checkpoint_steps=ckpts,
        checkpoints_kept=kept,
        naive_steps_per_epoch=round(naive, 2), naive_max_train_steps=round(naive * t.epochs, 2),
        lr=cfg.optimizer.lr, schedule=asdict(sched),
        lr_curve=[(s, round(v, 12)) for s, v in lr_schedule.curve(sched, cfg.optimizer.lr, max_steps)],
        warnings=warnings, estimate=est.to_dict() if est else None,
    )


def _warnings(cfg: ExperimentConfig, concepts: List[ConceptPlan], ckpts: List[int]) -> List[str]:
    out = [f"concept '{c.id}': bucket {k} ({n} images) is pruned: fewer samples than one batch"
           for c in concepts for k, n in c.pruned_buckets.items()]
    out += [f"concept '{c.id}': bucket {k} ({n} images) is short of one effective batch; "
            "dataset.allow_oversubscription makes SimpleTuner repeat its images to fill it"
            for c in concepts for k, n in c.padded_buckets.items()]
    out += [f"concept '{c.id}': bucket {k} is short of one effective batch: SimpleTuner 4.10.1 would abort "
            "training on it (stage=plan names its images and the fixes)"
            for c in concepts if cfg.stage not in TRAINING_STAGES for k in c.short_buckets]
    out += [f"concept '{c.id}': {c.skipped_images} images are below dataset.minimum_image_size and skipped"
            for c in concepts if c.skipped_images]
    out += _interval_warnings(cfg, ckpts) + _shared_folder_warnings(cfg)
    keep = cfg.checkpointing.keep
    if keep and len(ckpts) > keep:
        out.append(f"checkpointing.keep={keep} < {len(ckpts)} checkpoints: SimpleTuner will delete "
                   f"the oldest {len(ckpts) - keep} (steps {ckpts[0]}..{ckpts[-keep - 1]}) before they "
                   "can be evaluated; raise checkpointing.keep to keep them all")
    return out


def _interval_warnings(cfg: ExperimentConfig, ckpts: List[int]) -> List[str]:
    ck = cfg.checkpointing
    if ckpts or not (ck.every_steps or ck.every_epochs):
        return []
    key = "every_steps" if ck.every_steps else "every_epochs"
    return [f"checkpointing.{key}={getattr(ck, key)} is longer than the run: no checkpoint is saved, only the "
            f"final weights; lower checkpointing.{key} to evaluate the training along the way"]


def _shared_folder_warnings(cfg: ExperimentConfig) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for i, c in enumerate(cfg.concepts):
        if c.path in seen:
            out.append(f"concepts[{i}].path and concepts[{seen[c.path]}].path are the same folder {c.path}: "
                       "its images are trained as both concepts")
        seen.setdefault(c.path, i)
    return out


def held_out_note(c: ConceptPlan) -> str:
    return f", +{len(c.held_out)} held out" if c.held_out else ""


def _max_steps_basis(plan: Plan) -> str:
    """Where the step count comes from: the naive count it replaces, or training.max_steps (no epochs given)."""
    return f"naive x epochs: {plan.naive_max_train_steps}" if plan.naive_max_train_steps else "training.max_steps"


def render_table(plan: Plan) -> str:
    """The plan as a short fixed-width table for the terminal."""
    rows = [("concept", "images", "passes", "ST repeats", "buckets", "batches/epoch")]
    rows += [(c.id, f"{c.images} ({c.image_source}{held_out_note(c)})", str(c.passes), str(c.simpletuner_repeats),
              ", ".join(f"{k}:{n}" for k, n in c.buckets.items()) or "-", str(c.batches_per_epoch))
             for c in plan.concepts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    every = (f"every {plan.checkpoint_interval_steps} steps" if plan.checkpoint_interval_steps
             else f"every {plan.checkpoint_interval_epochs} epoch(s)")
    lines += [
        "",
        f"steps/epoch      {plan.steps_per_epoch:>10}   (naive images x passes / batch: {plan.naive_steps_per_epoch})",
        f"max train steps  {plan.max_train_steps:>10}   ({_max_steps_basis(plan)}); "
        f"{plan.epochs} epoch(s), stop by {plan.stop_rule}",
        f"checkpoints      {len(plan.checkpoint_steps):>10}   {every}, kept {len(plan.checkpoints_kept)}",
        f"lr schedule      {plan.schedule['scheduler']:>10}   lr {plan.lr:g} -> {plan.lr_curve[-1][1]:g} "
        f"(warmup/period {plan.schedule['warmup_steps']})",
    ]
    if plan.cache_dir:
        state = "filled earlier" if Path(plan.cache_dir).is_dir() else "new"
        lines.append(f"cache            {Path(plan.cache_dir).name:>10}   {plan.cache_dir} ({state})")
    lines += estimate.render(estimate.from_dict(plan.estimate))
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
