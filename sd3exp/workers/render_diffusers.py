"""Render checkpoints x variants x prompts x seeds in-process with diffusers' StableDiffusion3Pipeline.

Standalone worker, run by the trainer venv's python (stdlib, torch, diffusers,
safetensors, peft); sd3exp never imports it. Usage: render_diffusers.py JOB.json

The job (JSON): base (pipeline folder), checkpoints ([{label, step, kind:
base|full|lora, path, variants: [{name, scale (LoRA only: alpha/rank x strength), sampling (pipeline
arguments of this variant), scheduler (null, or {class: a diffusers scheduler class name or null for
the pipeline's, options: its config overrides such as shift})}]}]), prompts, seeds,
sampling (StableDiffusion3Pipeline keyword arguments such as num_inference_steps, guidance_scale, width, height,
negative_prompt), out_dir, image_name (a str.format pattern with label, variant,
prompt_index, seed and suffix), skip ([label, prompt_index, seed, variant] not to render).

The job may also give device (auto|cuda|cpu|mps), dtype (auto|bf16|fp16|fp32), offload (model
CPU offload), t5 (false: no T5-XXL) and max_sequence_length (T5 tokens, as trained); without them
the pipeline renders on the CPU in float32. The base pipeline loads once; each checkpoint's weights
are swapped in (full: its transformer state dict; lora: its tensors through
load_lora_weights at the job's scale, never the file's metadata; unloaded
before the next). stdout carries one JSON line per cell, nothing else:
{label, step, variant, prompt_index, seed, status: ok|error, path, error, seconds}.
A failing cell (or checkpoint) is reported and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

import diffusers
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file

from render_device import pick_device, pick_dtype  # this folder's stdlib module

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LORA_ADAPTER = "sd3exp"


def protocol_stream() -> TextIO:
    """The real stdout, for progress lines; fd 1 and sys.stdout then go to stderr (library chatter)."""
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def placement(job: dict) -> tuple[str, torch.dtype]:
    """The job's device and dtype, "auto" resolved against what torch sees here."""
    mps = getattr(torch.backends, "mps", None)
    device = pick_device(job.get("device", "cpu"), torch.cuda.is_available(), bool(mps and mps.is_available()))
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return device, DTYPES[pick_dtype(job.get("dtype", "fp32"), device, bf16)]


def load_pipeline(base: str, device: str, dtype: torch.dtype, offload: bool = False,
                  t5: bool = True) -> StableDiffusion3Pipeline:
    """The base pipeline on `device` in `dtype` (or offloaded to the CPU between models), offline,
    without progress bars; without T5-XXL when t5 is false."""
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    if offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


class Weights:
    """Keeps track of what is loaded into the pipeline and swaps checkpoints in and out."""

    def __init__(self, pipe: StableDiffusion3Pipeline, base: str, dtype: torch.dtype = torch.float32) -> None:
        self.pipe, self.base, self.dtype, self.state = pipe, base, dtype, "base"

    def use(self, kind: str, path: str | None, scale: float = 1.0) -> None:
        """Load one checkpoint (kind base|full|lora, a LoRA at `scale`); raises when its weights cannot
        be loaded."""
        if self.state == "lora":
            self.pipe.unload_lora_weights()
            self.state = "base"
        if self.state == "full" and kind != "full":
            self.restore_base()
        if kind == "full":
            self.state = "full"  # a failed load may leave some tensors replaced
            self.pipe.transformer.load_state_dict(load_file(path), strict=True)
        elif kind == "lora":
            self.state = "lora"
            # the bare tensors: diffusers would take alpha/rank from the file's metadata, which
            # SimpleTuner writes into checkpoint-N but not into the final model; the scale is explicit
            self.pipe.load_lora_weights(load_file(path), adapter_name=LORA_ADAPTER)
            self.pipe.set_adapters([LORA_ADAPTER], [scale])
        elif kind != "base":
            raise ValueError(f"unknown checkpoint kind {kind!r} (base, full or lora)")

    def restore_base(self) -> None:
        """Put the base transformer's weights back after a full checkpoint."""
        base = SD3Transformer2DModel.from_pretrained(self.base, subfolder="transformer", dtype=self.dtype,
                                                     local_files_only=True)
        self.pipe.transformer.load_state_dict(base.state_dict(), strict=True)
        self.state = "base"


def save_png(image: Any, path: Path) -> None:
    """Save through a temporary file and rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(exc: BaseException) -> str:
    """`Type: message`, and the traceback to stderr for the log."""
    traceback.print_exception(exc, file=sys.stderr)
    return f"{type(exc).__name__}: {exc}".strip()


def render_cell(pipe: StableDiffusion3Pipeline, sampling: dict, prompt: str, seed: int, path: Path,
                device: str = "cpu") -> None:
    """One image from a generator seeded on the render device (seeds reproduce there), saved as a PNG."""
    generator = torch.Generator(device).manual_seed(seed)
    image = pipe(prompt=prompt, generator=generator, **sampling).images[0]
    save_png(image, path)


def use_variant(pipe: StableDiffusion3Pipeline, original: Any, variant: dict) -> None:
    """Set the variant's LoRA scale and scheduler (`original`: the pipeline's own scheduler)."""
    if variant.get("scale") is not None:
        pipe.set_adapters([LORA_ADAPTER], [variant["scale"]])
    spec = variant.get("scheduler")
    if spec is None:
        pipe.scheduler = original
        return
    cls = getattr(diffusers, spec["class"]) if spec.get("class") else type(original)
    pipe.scheduler = cls.from_config(original.config, **spec.get("options", {}))


def sweep(job: dict, out: TextIO) -> None:
    """Render every cell not in job["skip"], checkpoint by checkpoint, one JSON line per cell to `out`."""
    device, dtype = placement(job)
    print(f"rendering on {device} in {dtype}", file=sys.stderr)
    pipe = load_pipeline(job["base"], device, dtype, job.get("offload", False), job.get("t5", True))
    weights, original = Weights(pipe, job["base"], dtype), pipe.scheduler
    job = {**job, "device": device}
    skip = {tuple(cell) for cell in job.get("skip", [])}
    for ckpt in job["checkpoints"]:
        try:
            weights.use(ckpt["kind"], ckpt.get("path"), ckpt["variants"][0].get("scale") or 1.0)
            load_error = ""
        except Exception as exc:  # noqa: BLE001 - reported per cell, the sweep goes on
            load_error = f"{describe(exc)} (loading {ckpt['kind']} weights from {ckpt.get('path')})"
        for variant in ckpt["variants"]:
            error = load_error
            if not error:
                try:
                    use_variant(pipe, original, variant)
                except Exception as exc:  # noqa: BLE001 - reported per cell, the sweep goes on
                    error = f"{describe(exc)} (setting up variant {variant['name']!r})"
            for index in range(len(job["prompts"])):
                for seed in (s for s in job["seeds"] if (ckpt["label"], index, s, variant["name"]) not in skip):
                    line = cell_line(pipe, job, ckpt, variant, index, seed, error)
                    out.write(json.dumps(line) + "\n")


def cell_line(pipe: StableDiffusion3Pipeline, job: dict, ckpt: dict, variant: dict, index: int, seed: int,
              load_error: str) -> dict:
    """Render one cell (unless its checkpoint failed to load); its progress line."""
    name = job["image_name"].format(label=ckpt["label"], variant=variant["name"], prompt_index=index, seed=seed,
                                    suffix="")
    path = Path(job["out_dir"]) / name
    line = {"label": ckpt["label"], "step": ckpt.get("step"), "variant": variant["name"], "prompt_index": index,
            "seed": seed, "status": "error", "path": None, "error": load_error, "seconds": 0.0}
    start = time.monotonic()
    if not load_error:
        try:
            sampling = {**job["sampling"], **variant["sampling"],
                        **({"max_sequence_length": job["max_sequence_length"]} if "max_sequence_length" in job else {})}
            render_cell(pipe, sampling, job["prompts"][index], seed, path, job["device"])
            line.update(status="ok", path=str(path))
        except Exception as exc:  # noqa: BLE001 - reported per cell, the sweep goes on
            line["error"] = describe(exc)
    line["seconds"] = round(time.monotonic() - start, 3)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="JSON job file")
    args = parser.parse_args(argv)
    out = protocol_stream()
    sweep(json.loads(args.job.read_text(encoding="utf-8")), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
