"""GPU memory and disk estimates of a training run, before it starts (docs/estimates.md).

Pure arithmetic on the experiment: the transformer's shape (its own transformer/config.json when
the model is a local folder or in the Hugging Face hub cache, published shapes for known hub ids),
the precisions, the optimizer's state size, batch x tokens, gradient checkpointing, LoRA targets
and rank. No torch: `stage=plan` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:  # stdlib only at run time: benchmarks/gpu_check.py imports this module on a bare GPU image
    from sd3exp.schema import ExperimentConfig

GIB = 1024 ** 3
GB = 1000 ** 3
TEXT_TOKENS = 77 + 154  # CLIP-L/G (77) joined with T5-XXL at SimpleTuner's SD3 limit (154)
VAE_FACTOR = 8
BLOCK_TENSORS = 21  # hidden-sized activations one MM-DiT block keeps for backward (calibrated, docs/estimates.md)
LORA_TARGETS = 4  # SimpleTuner's SD3 default: to_q, to_k, to_v, to_out.0 (in every attention)

SD3_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "caption_projection_dim": 1536,
              "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "in_channels": 16, "out_channels": 16,
              "patch_size": 2}
PUBLISHED: Dict[str, dict] = {  # transformer/config.json of the published models (diffusers layout)
    "stabilityai/stable-diffusion-3-medium-diffusers": SD3_MEDIUM,
    "stabilityai/stable-diffusion-3.5-medium": {**SD3_MEDIUM, "dual_attention_layers": list(range(13)),
                                                "qk_norm": "rms_norm"},
    "stabilityai/stable-diffusion-3.5-large": {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38,
                                               "caption_projection_dim": 2432, "qk_norm": "rms_norm"},
}
FLAVOURS = {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"}

WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "no": 4.0, "fp8": 1.0}
BASE_BYTES = {"no_change": None, "int8-quanto": 1.0, "int8-torchao": 1.0, "fp8-torchao": 1.0, "fp8uz-quanto": 1.0,
              "int4-quanto": 0.5, "int4-torchao": 0.5, "nf4-bnb": 0.5, "int2-quanto": 0.25}
# optimizer state per trained parameter, in bytes (None: two buffers of the weights' precision)
OPTIMIZER_BYTES: Dict[str, Optional[float]] = {
    "adamw_bf16": 6.0,  # AdamWBF16: exp_avg, exp_avg_sq and a compensation buffer, all bf16
    "adamw": None, "torch-adamw": None, "adam": None, "optimi-adamw": None, "optimi-stableadamw": None,
    "bnb-adamw8bit": 2.0, "bnb-adamw8bit-paged": 2.0, "ao-adamw8bit": 2.0, "bnb-adam8bit": 2.0,
    "ao-adamw4bit": 1.0, "bnb-lion8bit": 1.0, "bnb-lion8bit-paged": 1.0, "optimi-lion": 2.0,
    "sdnq-adamw": 2 * (1 + 2 / 32),  # SDNQ: two uint8 buffers, a bf16 scale per group of 32
    "adafactor": 0.1, "prodigy": 16.0, "bnb-adamw-paged": 8.0,
}


@dataclass(frozen=True)
class GpuMemory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    total: float


@dataclass(frozen=True)
class Disk:
    per_checkpoint: float
    kept: float
    total: float


@dataclass(frozen=True)
class Estimate:
    """GiB figures of one run (plan.json `estimate`)."""

    parameters: int
    trained_parameters: int
    tokens_per_sample: int
    gpu_memory_gib: GpuMemory
    disk_gib: Disk

    def to_dict(self) -> dict:
        return asdict(self)


def transformer_parameters(c: dict) -> int:
    """Parameters of diffusers' SD3Transformer2DModel with config `c` (pos_embed is a buffer)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    cap, layers, p = c.get("caption_projection_dim", d), c["num_layers"], c.get("patch_size", 2)
    dual = set(c.get("dual_attention_layers") or ())
    head_norms = 2 * c["attention_head_dim"] if c.get("qk_norm") else 0

    def lin(i: int, o: int) -> int:
        return i * o + o

    ff = lin(d, 4 * d) + lin(4 * d, d)
    n = lin(c["in_channels"] * p * p, d) + lin(256, d) + lin(d, d) + lin(c["pooled_projection_dim"], d) + lin(d, d)
    n += lin(c["joint_attention_dim"], cap) + lin(d, 2 * d) + lin(d, p * p * c.get("out_channels", 16))
    for i in range(layers):
        last = i == layers - 1
        n += lin(d, 9 * d if i in dual else 6 * d) + (lin(d, 2 * d) if last else lin(d, 6 * d))
        n += 7 * lin(d, d) + (0 if last else lin(d, d)) + 2 * head_norms + ff + (0 if last else ff)
        n += 4 * lin(d, d) + head_norms if i in dual else 0
    return n


def hub_cache_config(repo: str) -> Optional[Path]:
    """transformer/config.json of `repo` in the Hugging Face hub cache, if a snapshot holds one."""
    cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    snapshots = Path(cache) / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/transformer/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def model_config(path: str, flavour: Optional[str] = None) -> Optional[dict]:
    """The transformer's config: the local folder's, the hub cache's, else the published one; None if unknown."""
    repo = path or FLAVOURS.get(flavour or "", "")
    local = Path(repo) / "transformer" / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    cached = hub_cache_config(repo) if "/" in repo and not Path(repo).is_absolute() else None
    if cached:
        return json.loads(cached.read_text(encoding="utf-8"))
    return PUBLISHED.get(repo)


def image_pixels(resolution: float, resolution_type: str) -> float:
    return resolution * 1e6 if resolution_type == "area" else float(resolution) ** 2


def lora_parameters(c: dict, rank: int) -> int:
    """LoRA A and B of SimpleTuner's default SD3 targets, in every attention (joint and dual)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    attentions = c["num_layers"] + len(c.get("dual_attention_layers") or ())
    return attentions * LORA_TARGETS * rank * 2 * d


def optimizer_bytes(name: str, weight_bytes: float) -> float:
    known = OPTIMIZER_BYTES.get(name, 8.0)
    return 2 * weight_bytes if known is None else known


def estimate(cfg: ExperimentConfig, checkpoints_kept: int, c: Optional[dict] = None) -> Optional[Estimate]:
    """The estimate of `cfg` with `checkpoints_kept` checkpoints on disk; None when the model's shape is unknown."""
    c = c or model_config(cfg.model.path, cfg.model.flavour)
    if c is None:
        return None
    t, lora = cfg.training, cfg.model.type == "lora"
    params, d = transformer_parameters(c), c["num_attention_heads"] * c["attention_head_dim"]
    act_bytes = WEIGHT_BYTES.get(t.mixed_precision, 2.0)
    base = BASE_BYTES.get(cfg.model.base_precision) or act_bytes
    trained = lora_parameters(c, cfg.lora.rank) if lora else params
    train_bytes = 4.0 if lora else act_bytes  # LoRA weights train in fp32 over the (quantised) base
    state = optimizer_bytes(cfg.optimizer.name, train_bytes)
    weights = params * (base if lora else act_bytes) + (trained * train_bytes if lora else 0)
    grads, opt = trained * train_bytes, trained * state
    tokens = int(image_pixels(cfg.dataset.resolution, cfg.dataset.resolution_type)
                 / (VAE_FACTOR * c.get("patch_size", 2)) ** 2) + TEXT_TOKENS
    per_tensor = t.batch_size * tokens * d * act_bytes
    layers = c["num_layers"]
    acts = per_tensor * (layers + BLOCK_TENSORS if t.gradient_checkpointing else layers * BLOCK_TENSORS)
    saved = trained * (train_bytes if lora else act_bytes)
    per_ckpt = saved + trained * state
    memory = [weights / GIB, grads / GIB, opt / GIB, acts / GIB]
    gib_weights, gib_grads, gib_opt, gib_acts = _r(memory)
    return Estimate(params, trained, tokens, GpuMemory(gib_weights, gib_grads, gib_opt, gib_acts, total=_r1(sum(memory))),
                    Disk(_r1(per_ckpt / GIB), _r1(per_ckpt * checkpoints_kept / GIB),
                         _r1((per_ckpt * checkpoints_kept + saved) / GIB)))


def _r1(x: float) -> float:
    return round(x, 2)


def _r(xs: Sequence[float]) -> List[float]:
    return [_r1(x) for x in xs]


def free_gib(folder: Path) -> float:
    """Free space of the file system that holds `folder` (or, before it exists, its nearest parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / GIB


def disk_warning(est: Estimate, run_dir: Path, kept: int, keep_key: int, name: str) -> Optional[str]:
    """A warning when the kept checkpoints and final weights exceed the free disk at the run folder."""
    free = free_gib(run_dir)
    if est.disk_gib.total <= free:
        return None
    fits = max(0, int((free - (est.disk_gib.total - est.disk_gib.kept)) // est.disk_gib.per_checkpoint))
    return (f"disk: {kept} kept checkpoint(s) x {est.disk_gib.per_checkpoint} GiB + the final weights = "
            f"{est.disk_gib.total} GiB, but {free:.1f} GiB are free at {run_dir} (short by "
            f"{est.disk_gib.total - free:.1f} GiB); keep fewer (checkpointing.keep={max(1, fits)}; it is {keep_key}) "
            f"or put the run folder on a larger disk (hydra.run.dir=/mnt/larger-disk/{name})")


def memory_warning(est: Estimate, gpu_gib: float, fits: Optional[str]) -> Optional[str]:
    """A warning when the estimated GPU memory exceeds training.gpu_memory_gib; `fits`: a preset that does."""
    total = est.gpu_memory_gib.total
    if total <= gpu_gib:
        return None
    fix = f"add memory={fits} to the command" if fits else "no memory preset fits: lower the batch or resolution"
    return (f"GPU memory: the estimate is {total} GiB (weights {est.gpu_memory_gib.weights}, gradients "
            f"{est.gpu_memory_gib.gradients}, optimizer {est.gpu_memory_gib.optimizer}, activations "
            f"{est.gpu_memory_gib.activations}), {total - gpu_gib:.2f} GiB over training.gpu_memory_gib={gpu_gib:g}; "
            f"{fix}")


def render(est: Optional[Estimate]) -> List[str]:
    """Plan-table lines of the estimate."""
    if est is None:
        return ["estimate         unknown      the model's transformer/config.json was not found"]
    m, dk = est.gpu_memory_gib, est.disk_gib
    return [f"GPU memory (est) {m.total:>7.2f} GiB  weights {m.weights} + gradients {m.gradients} + optimizer "
            f"{m.optimizer} + activations {m.activations} ({est.tokens_per_sample} tokens/sample)",
            f"disk (est)       {dk.total:>7.2f} GiB  {dk.per_checkpoint} GiB per checkpoint, {dk.kept} GiB kept "
            f"+ the final weights"]


def presets(conf_dir: Path) -> Dict[str, float]:
    """The memory presets (conf/memory/*.yaml) by name, with the card size each is for."""
    from omegaconf import OmegaConf

    sizes = {p.stem: OmegaConf.load(p).training.gpu_memory_gib for p in (conf_dir / "memory").glob("*.yaml")}
    return dict(sorted(sizes.items(), key=lambda kv: kv[1]))


def with_preset(cfg: ExperimentConfig, conf_dir: Path, name: str) -> ExperimentConfig:
    """`cfg` with memory preset `name` applied on top (the command line's own overrides are not replayed)."""
    from omegaconf import OmegaConf

    from sd3exp import project
    from sd3exp.experiment import to_experiment

    project.register()
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.load(conf_dir / "memory" / f"{name}.yaml"))
    return to_experiment(merged)


def fitting_preset(cfg: ExperimentConfig, conf_dir: Path, gpu_gib: float, kept: int, c: dict) -> Optional[str]:
    """The largest memory preset for a card of at most `gpu_gib` whose estimate fits it."""
    for name, size in reversed(list(presets(conf_dir).items())):
        if size <= gpu_gib:
            est = estimate(with_preset(cfg, conf_dir, name), kept, c)
            if est and est.gpu_memory_gib.total <= gpu_gib:
                return name
    return None


def memory_warnings(cfg: ExperimentConfig, conf_dir: Path, kept: int) -> List[str]:
    """The plan's GPU-memory warning, if training.gpu_memory_gib is set and the estimate exceeds it."""
    c = model_config(cfg.model.path, cfg.model.flavour)
    gpu = cfg.training.gpu_memory_gib
    est = estimate(cfg, kept, c) if c else None
    if est is None or gpu is None or not c or memory_warning(est, gpu, None) is None:
        return []
    warning = memory_warning(est, gpu, fitting_preset(cfg, conf_dir, gpu, kept, c))
    return [warning] if warning else []


def from_dict(data: Optional[dict]) -> Optional[Estimate]:
    """An Estimate from its plan.json form."""
    if data is None:
        return None
    return Estimate(data["parameters"], data["trained_parameters"], data["tokens_per_sample"],
                    GpuMemory(**data["gpu_memory_gib"]), Disk(**data["disk_gib"]))
