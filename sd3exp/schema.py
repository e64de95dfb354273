"""Typed experiment schema, registered in Hydra's ConfigStore.

A value of the wrong type is refused before Hydra composes (:mod:`sd3exp.field_types`), a
misspelt key at composition time; semantic checks live in :mod:`sd3exp.validate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

SCHEMA_VERSION = 2


@dataclass
class CaptionsConfig:
    """Caption handling for one concept (kohya's shuffle_caption / keep_tokens)."""

    shuffle: bool = False
    keep_tags: int = 0
    separator: str = ","
    mode: str = "native"  # native: SimpleTuner caption_shuffle; materialized: R copies
    variants: Optional[int] = None  # native: shuffled variants per caption (default: repeats)
    seed: Optional[int] = None  # default: the experiment's seed
    require_trigger: bool = True
    allow_missing: bool = False


@dataclass
class ConceptConfig:
    """One folder of images with captions, its trigger word and repeats."""

    id: str = MISSING
    path: str = MISSING
    trigger: str = MISSING
    repeats: int = 1  # passes per epoch, kohya's meaning (SimpleTuner repeats = N - 1)
    num_images: Optional[int] = None  # declared count, used when the folder is absent
    caption_strategy: str = "textfile"
    probability: float = 1.0
    holdout: int = 0  # images held out of training for SimpleTuner's validation loss (seeded choice)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)


@dataclass
class ModelConfig:
    family: str = "sd3"
    type: str = "full"  # full | lora
    path: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    flavour: Optional[str] = None
    base_precision: str = "no_change"


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    type: str = "standard"
    format: str = "diffusers"  # diffusers | comfyui


@dataclass
class DatasetConfig:
    """Settings shared by every concept's dataset entry."""

    resolution: Any = 1024  # a number: pixels (pixel, pixel_area) or megapixels (area); checked by validate
    resolution_type: str = "pixel_area"
    minimum_image_size: Any = None  # null or a number in the same unit as resolution
    crop: bool = False
    crop_style: str = "center"
    crop_aspect: str = "square"
    allow_oversubscription: bool = False  # SimpleTuner pads a bucket short of one effective batch (repeats=0 only)
    caption_dropout: float = 0.1
    prepared_dir: str = "${paths.run_dir}/dataset"
    cache_dir: str = "${paths.output_root}/cache"  # one <cache key>/ per dataset (sd3exp/cache.py)


@dataclass
class OptimizerConfig:
    name: str = "adamw_bf16"
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    clip: str = "norm"  # norm | value: how max_grad_norm clips (--grad_clip_method)


@dataclass
class ScheduleConfig:
    """The LR curve you want; the compiler maps it onto SimpleTuner's settings."""

    name: str = "constant"  # constant | linear | cosine | polynomial
    warmup_steps: Optional[int] = None
    warmup_fraction: Optional[float] = None
    final_lr: float = 0.0
    power: float = 1.0


@dataclass
class EarlyStopConfig:
    """Stop training when the live evaluation's objective stalls (sd3exp/live/); patience 0: off."""

    objective: Optional[str] = None  # a measure; null: eval.select.objective (with its direction)
    patience: int = 0  # checkpoints without improvement before stopping
    min_delta: float = 0.0  # an improvement must exceed this


@dataclass
class TrainingConfig:
    batch_size: int = 1
    epochs: int = 0
    max_steps: int = 0
    gradient_accumulation: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    gpu_memory_gib: Optional[float] = None  # the card's memory: the plan warns when its estimate exceeds it
    num_processes: int = 1
    num_machines: int = 1
    accelerate_config: Optional[str] = None
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


@dataclass
class CheckpointingConfig:
    """Exactly one of every_steps, every_epochs, round_to."""

    every_steps: Optional[int] = None
    every_epochs: Optional[int] = None
    round_to: Optional[int] = None  # source rule: interval = steps/epoch rounded up
    keep: int = 5


@dataclass
class ValidationConfig:
    """SimpleTuner's own in-training validation (off by default)."""

    enabled: bool = False
    prompt: str = ""
    every_steps: int = 0
    loss_every_steps: Optional[int] = None  # held-out loss interval (concepts[].holdout); default: checkpoints'


@dataclass
class TrainerConfig:
    simpletuner: Optional[str] = None  # an existing venv or git checkout
    version: str = "4.10.1"
    home: Optional[str] = None  # where managed trainer venvs live
    config_backend: str = "json"  # json | env: which file `simpletuner train` reads the arguments from
    extra_args: List[str] = field(default_factory=list)
    report_to: str = "none"
    new_run: bool = False
    force: bool = False
    cpu_shim: str = "auto"  # auto | never


@dataclass
class ScoringConfig:
    """Measures per cell (sd3exp/evaluate/score.py); the weight-free ones need no model."""

    enabled: bool = True
    thumbnail: int = 32  # side of the thumbnails pixel measures compare
    memorised_pixel: float = 97.0  # pixel_fidelity above this: a near-copy of one training image
    clip: Optional[str] = None  # local CLIP model folder: clip_t, clip_i
    dino: Optional[str] = None  # local DINO(v2) model folder: dino_i
    memorised_cosine: float = 0.95  # CLIP/DINO image cosine to one training image above this: a near-copy
    cache_dir: Optional[str] = None  # training-image embeddings; default: ~/.cache/sd3exp/embeddings
    pickscore: Optional[str] = None  # local PickScore folder (yuvalkirstain/PickScore_v1): pickscore
    pickscore_processor: Optional[str] = None  # the CLIP-H processor's folder; default: the PickScore folder
    aesthetic: Optional[str] = None  # LAION aesthetic predictor v2 head file (.pth): aesthetic
    aesthetic_clip: Optional[str] = None  # its CLIP ViT-L/14 folder; default: eval.scoring.clip
    hps: Optional[str] = None  # HPSv2.1 checkpoint file (HPS_v2.1_compressed.pt): hps


@dataclass
class SelectConfig:
    """How the best checkpoint is chosen (sd3exp/evaluate/select.py)."""

    objective: str = "pixel_fidelity"
    direction: Optional[str] = None  # max | min; default: the measure's own
    at_least: Dict[str, float] = field(default_factory=dict)  # guards: {measure: lowest allowed mean}
    at_most: Dict[str, float] = field(default_factory=dict)
    not_memorised: bool = False


@dataclass
class EvalConfig:
    backend: str = "diffusers"  # diffusers | comfyui | none
    url: Optional[str] = None
    workflow: Optional[str] = None
    prompts: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    negative_prompt: str = ""
    steps: Any = 28  # int, or a list of them: an axis (sd3exp/evaluate/axes.py)
    cfg: Any = 4.5  # float, or a list: an axis
    lora_scales: Any = 1.0  # multiplier(s) of a LoRA's trained alpha/rank: an axis
    sampler: Any = None  # ComfyUI sampler_name(s), e.g. euler; None: the workflow's / pipeline's own
    scheduler: Any = None  # ComfyUI scheduler name(s), e.g. simple; None: the workflow's / pipeline's own
    shift: Any = None  # ModelSamplingSD3 shift(s); None: the model's own
    width: int = 1024
    height: int = 1024
    every_k: int = 1
    min_step: Optional[int] = None
    max_step: Optional[int] = None
    include_base: bool = False
    include_final: bool = True
    live: bool = False  # evaluate each checkpoint as training saves it (sd3exp/live/)
    nodes: Dict[str, str] = field(default_factory=dict)
    workflow_inputs: Dict[str, Any] = field(default_factory=dict)  # {node id: {input: value}}
    models_dir: Optional[str] = None
    link_mode: str = "symlink"  # symlink | extra_paths
    timeout_s: float = 3600.0
    device: str = "auto"  # diffusers backend: auto | cuda | cpu | mps
    dtype: str = "auto"  # diffusers backend: auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp16 on old CUDA/mps, fp32 on CPU)
    offload: bool = False  # diffusers backend: model CPU offload (less GPU memory, slower)
    t5: bool = True  # diffusers backend: false renders without T5-XXL (text_encoder_3)
    cell_timeout_s: float = 600.0  # diffusers backend: longest one cell may take (the first includes loading)
    max_grid_pixels: int = 64_000_000
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class CaptionerConfig:
    """stage=caption: an OpenAI-compatible vision server (url) or a local program (command)."""

    url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1 (vLLM, llama-server, Ollama, LM Studio)
    model: Optional[str] = None  # null: the server's only model
    api_key_env: Optional[str] = None  # name of an environment variable holding a bearer token
    command: Optional[str] = None  # a program given the image path (appended, or at {image}); prints the caption
    prompt: str = "descriptive"  # a preset (descriptive | booru) or a Jinja template
    system: str = "You are a helpful image captioner."
    max_new_tokens: int = 300
    temperature: float = 0.6
    workers: int = 4
    only_missing: bool = True  # caption only images without a caption file of the user's
    timeout_s: float = 120.0
    retries: int = 3  # on 429, 5xx, connection errors and timeouts
    backoff_s: float = 1.0
    prefer: str = "user"  # user: your caption files win; model: the generated captions win
    add_trigger: bool = True
    max_length: Optional[int] = None  # estimated CLIP tokens; whole tags are kept
    out_dir: str = "${paths.run_dir}/captions"


@dataclass
class MlflowConfig:
    """MLflow logging after each evaluation (sd3exp/tracking/)."""

    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///<paths.output_root>/mlflow.db (artifacts beside it)
    experiment: Optional[str] = None  # MLflow experiment name; default: the sd3exp experiment's name


@dataclass
class TensorboardConfig:
    """TensorBoard event files under <run>/tensorboard (sd3exp/tracking/)."""

    enabled: bool = False


@dataclass
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)


@dataclass
class OptunaTrialConfig:
    """The Optuna trial a sweep job reports to (set by the sd3exp Optuna sweeper, sd3exp/optuna_sweep/)."""

    storage: Optional[str] = None  # the study's Optuna storage URL, or env:NAME (the URL in NAME: one with a password)
    study: Optional[str] = None  # the study's name
    trial: Optional[int] = None  # the trial's number; null: not an Optuna trial


@dataclass
class SweepConfig:
    """How a job belongs to a sweep: where and how to run, not what is trained (not in the run's identity)."""

    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_root: str = "${paths.root_dir}/outputs"
    run_dir: str = "${sd3exp.run_dir:}"
    training_dir: str = "${paths.run_dir}/training"


@dataclass
class ExperimentConfig:
    schema_version: int = SCHEMA_VERSION
    name: str = "default"
    stage: str = "all"
    seed: int = 42
    demo: bool = False  # build the tiny model and demo dataset when they are missing
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    concepts: List[ConceptConfig] = field(default_factory=list)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def schema_cache() -> Path:
    """The schema's pickle in the user's cache, named by this file's bytes and the OmegaConf and Python
    versions (any change to the schema is a new name)."""
    import hashlib
    import sys

    import omegaconf

    from sd3exp.io import user_cache

    key = hashlib.sha256(Path(__file__).read_bytes() + f"{omegaconf.__version__} {sys.version}".encode()).hexdigest()
    return user_cache() / "schema" / f"{key[:20]}.pickle"


def schema_node() -> DictConfig:
    """OmegaConf's node of ExperimentConfig. OmegaConf builds it from the dataclasses in 50-80 ms, a large
    part of every command's start-up; its pickle loads in 1 ms, so it is kept in the user's cache and built
    again where that file is missing, unreadable or not this schema's."""
    import pickle

    from sd3exp.errors import DiskFullError
    from sd3exp.io import write_bytes

    path = schema_cache()
    try:
        node = pickle.loads(path.read_bytes())
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) is ExperimentConfig:
            return node
    except Exception:  # noqa: BLE001 - a missing or broken cache file is only a slower start
        pass
    data = pickle.dumps(OmegaConf.structured(ExperimentConfig))
    with contextlib.suppress(OSError, DiskFullError):
        write_bytes(path, data, sync=False)
    return pickle.loads(data)  # as every later start reads it: the same ConfigStore node (compose_cache's key)


def register() -> None:
    """Make the schema the base of conf/config.yaml (`- sd3exp_schema` in defaults)."""
    ConfigStore.instance().store(name="sd3exp_schema", node=schema_node())
