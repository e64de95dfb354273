"""Measured GPU memory and speed of compiled runs against the plan's estimate (issue 19).

    python benchmarks/gpu_check.py [--scale full|tiny] [--steps 20] [RUN ...]

Each RUN is a compiled run folder (config/config.json + plan.json; default: compiled/fantasy_art and
compiled/fantasy_art_lora). For each, the script builds locally (no hub) a randomly initialised SD3
transformer with SD3 Medium's published shapes (`--scale tiny`: models/tiny-sd3's shapes, on the CPU)
and measures the training step SimpleTuner would run: the compiled precision, batch, resolution,
gradient checkpointing, optimizer and LoRA rank/targets. SimpleTuner itself is not run (it does not
fit the 64 MiB a GPU machine carries); the script says which optimizer stood in where the compiled
one is not installed. Then a 4-cell diffusers evaluation (StableDiffusion3Pipeline with the random
transformer and a random SD3 VAE, from prompt embeddings: no text encoders). It prints peak memory
(torch's allocator and nvidia-smi), s/step, s/cell and the estimate (sd3exp/estimate.py) beside each.

Run it with a Python that has torch, diffusers and peft (the trainer venv here; on a bare GPU image,
`make gpu-wheelhouse` first: the script installs diffusers from benchmarks/wheelhouse/ offline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WHEELHOUSE = ROOT / "benchmarks" / "wheelhouse"
TINY = {"attention_head_dim": 64, "caption_projection_dim": 128, "dual_attention_layers": [], "in_channels": 16,
        "joint_attention_dim": 4096, "num_attention_heads": 2, "num_layers": 2, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 32, "qk_norm": None, "sample_size": 32}
SD3_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
           "use_post_quant_conv": False}
TINY_VAE = {**SD3_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32}


def ensure_diffusers() -> None:
    """Install diffusers from the carried wheelhouse when the image lacks it (no registry is reachable)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELHOUSE),
                        "diffusers"], check=True)


def transformer_config(scale: str, run_cfg: dict) -> dict:
    from sd3exp import estimate

    if scale == "tiny":
        return TINY
    return estimate.model_config(run_cfg["pretrained_model_name_or_path"], run_cfg.get("model_flavour")) or \
        estimate.PUBLISHED[estimate.FLAVOURS["medium"]]


def plan_estimate(run_cfg: dict, kept: int, shape: dict, resolution: int, batch: int) -> dict:
    """The estimate of the compiled settings for the transformer actually built."""
    from sd3exp import estimate

    cfg = SimpleNamespace(
        model=SimpleNamespace(type=run_cfg["model_type"], base_precision=run_cfg.get("base_model_precision",
                                                                                        "no_change")),
        lora=SimpleNamespace(rank=run_cfg.get("lora_rank", 16)), optimizer=SimpleNamespace(name=run_cfg["optimizer"]),
        training=SimpleNamespace(mixed_precision=run_cfg["mixed_precision"], batch_size=batch,
                                 gradient_checkpointing=run_cfg.get("gradient_checkpointing", False)),
        dataset=SimpleNamespace(resolution=resolution, resolution_type="pixel_area"))
    return estimate.estimate(cfg, kept, shape).to_dict()


def make_optimizer(name: str, params: List, lr: float):
    """The compiled optimizer where installed; AdamW (with a bf16 compensation buffer for adamw_bf16) otherwise."""
    import torch

    if name == "sdnq-adamw":
        try:
            from sdnq.optim import AdamW as SDNQAdamW

            return SDNQAdamW(params, lr=lr, use_quantized_buffers=True, quantized_buffers_dtype="uint8",
                             quantized_buffers_group_size=32), "sdnq-adamw"
        except ImportError:
            pass
    opt = torch.optim.AdamW(params, lr=lr)
    if name == "adamw_bf16":  # AdamWBF16 keeps a third bf16 buffer (Kahan compensation)
        opt.compensation = [torch.zeros_like(p) for p in params]
        return opt, "torch AdamW + bf16 compensation buffer (as AdamWBF16)"
    return opt, "torch AdamW" + ("" if name in ("adamw", "torch-adamw") else f" (stand-in for {name})")


class Peak:
    """Peak GPU memory: torch's allocator and nvidia-smi (polled)."""

    def __init__(self, device: str) -> None:
        self.device, self.smi = device, 0.0

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.smi = 0.0

    def poll(self) -> None:
        if self.device != "cuda":
            return
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            self.smi = max(self.smi, float(out.stdout.split()[0]) / 1024)

    def torch_gib(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 1024 ** 3 if self.device == "cuda" else float("nan")


def train_steps(run_cfg: dict, shape: dict, res: int, batch: int, steps: int, device: str, peak: Peak) -> Dict:
    import torch
    from diffusers import SD3Transformer2DModel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run_cfg["mixed_precision"], torch.float32)
    model = SD3Transformer2DModel.from_config(shape).to(device, dtype)
    if run_cfg.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    lora = run_cfg["model_type"] == "lora"
    if lora:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=run_cfg.get("lora_rank", 16), lora_alpha=run_cfg.get("lora_alpha", 16),
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, used = make_optimizer(run_cfg["optimizer"], params, run_cfg.get("learning_rate", 1e-4))
    side = res // 8
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)

    peak.reset()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        latents, noise = rand(batch, 16, side, side), rand(batch, 16, side, side)
        t = torch.rand(batch, generator=gen).to(device)
        noisy = ((1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise).to(dtype)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(hidden_states=noisy, encoder_hidden_states=rand(batch, 231, shape["joint_attention_dim"]),
                        pooled_projections=rand(batch, shape["pooled_projection_dim"]), timestep=t * 1000).sample
        loss = torch.nn.functional.mse_loss(out.float(), (noise - latents).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        peak.poll()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    result = {"optimizer_used": used, "s_per_step": sum(steady) / len(steady), "peak_torch_gib": peak.torch_gib(),
              "peak_smi_gib": peak.smi}
    del opt, params
    model.requires_grad_(False)
    return {"model": model.to(dtype), "train": result}


def evaluate(model, shape: dict, scale: str, res: int, device: str, peak: Peak, cells: int = 4) -> Dict:
    """Four cells of StableDiffusion3Pipeline from prompt embeddings (the VAE random at SD3's shapes)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    dtype = next(model.parameters()).dtype
    vae = AutoencoderKL.from_config(TINY_VAE if scale == "tiny" else SD3_VAE).to(device, dtype)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(1, 231, shape["joint_attention_dim"], generator=gen).to(device, dtype)
    pooled = torch.randn(1, shape["pooled_projection_dim"], generator=gen).to(device, dtype)
    peak.reset()
    times = []
    steps = 4 if scale == "tiny" else 28
    for seed in range(cells):
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=pooled, height=res, width=res, num_inference_steps=steps,
                 guidance_scale=4.5, generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np")
        if device == "cuda":
            torch.cuda.synchronize()
        peak.poll()
        times.append(time.perf_counter() - start)
    return {"cells": cells, "steps_per_cell": steps, "s_per_cell": sum(times) / len(times),
            "peak_torch_gib": peak.torch_gib(), "peak_smi_gib": peak.smi}


def check(run: Path, scale: str, steps: int) -> Dict:
    import torch

    run_cfg = json.loads((run / "config" / "config.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    device = "cuda" if scale == "full" and torch.cuda.is_available() else "cpu"
    if device == "cpu":  # bf16 matmuls crawl on a CPU; SimpleTuner itself trains with mixed_precision=no there
        run_cfg = {**run_cfg, "mixed_precision": "no"}
    res = int(run_cfg.get("resolution", 1024)) if scale == "full" else 64
    batch = int(run_cfg["train_batch_size"]) if scale == "full" else 1
    shape = transformer_config(scale, run_cfg)
    est = plan_estimate(run_cfg, len(plan.get("checkpoints_kept", [])), shape, res, batch)
    peak = Peak(device)
    trained = train_steps(run_cfg, shape, res, batch, steps, device, peak)
    ev = evaluate(trained["model"], shape, scale, res, device, peak)
    del trained["model"]
    if device == "cuda":
        torch.cuda.empty_cache()
    measured = trained["train"]["peak_torch_gib"]
    total = est["gpu_memory_gib"]["total"]
    return {"run": run.name, "scale": scale, "device": device, "measured": "training step measured directly with "
            "torch (SimpleTuner not run)", "resolution": res, "batch": batch, "estimate_gib": est["gpu_memory_gib"],
            "train": trained["train"], "eval": ev,
            "estimate_error": None if measured != measured else round((total - measured) / measured, 3)}


def report(r: Dict) -> str:
    t, e, est = r["train"], r["eval"], r["estimate_gib"]
    return (f"{r['run']} ({r['scale']}, {r['device']}, {r['resolution']} px, batch {r['batch']}; {r['measured']}; "
            f"optimizer: {t['optimizer_used']})\n"
            f"  train  peak torch {t['peak_torch_gib']:.2f} GiB  nvidia-smi {t['peak_smi_gib']:.2f} GiB  "
            f"{t['s_per_step']:.3f} s/step   estimate {est['total']:.2f} GiB (weights {est['weights']}, gradients "
            f"{est['gradients']}, optimizer {est['optimizer']}, activations {est['activations']}); "
            f"estimate error {r['estimate_error']}\n"
            f"  eval   peak torch {e['peak_torch_gib']:.2f} GiB  nvidia-smi {e['peak_smi_gib']:.2f} GiB  "
            f"{e['s_per_cell']:.2f} s/cell ({e['cells']} cells x {e['steps_per_cell']} steps)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path,
                        default=[ROOT / "compiled" / "fantasy_art", ROOT / "compiled" / "fantasy_art_lora"])
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    ensure_diffusers()
    results = [check(run, args.scale, args.steps if args.scale == "full" else min(args.steps, 2)) for run in args.runs]
    for r in results:
        print(report(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
