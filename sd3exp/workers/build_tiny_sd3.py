"""Build a seeded tiny SD3 diffusers pipeline folder: random transformer and text encoders, trained VAE.

Standalone: run it with the trainer venv's python (torch, diffusers,
transformers), never import it from sd3exp. Nothing is downloaded: the
tokenizers are built from small local vocabularies. The transformer has the
shapes ComfyUI infers SD3 from (hidden 64 x depth, heads = depth), the two
CLIP encoders project to 1024 each (pooled 2048) and the T5 encoder has
d_model 4096, so the pipeline trains in SimpleTuner and loads in ComfyUI.

The VAE (16 latent channels, 8x downsampling) is trained for --vae-steps on
the RGB images of --vae-images (raw uint8 bytes, N x size x size x 3, the
last HELD_OUT kept for the PSNR it reports), on THREADS CPU threads with
deterministic kernels; scaling_factor and shift_factor then come from its
latents. --vae-steps 0 keeps a random VAE (every render is noise).

    python build_tiny_sd3.py OUT_DIR [--seed N] [--vae-steps S --vae-images FILE --vae-image-size 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "tiny_sd3.json"
FORMAT = 2
THREADS = 1
HELD_OUT = 64
VAE_TRAINING = {"batch_size": 8, "lr": 3e-3, "warmup_fraction": 0.05, "kl_weight": 1e-6, "initial_logvar": -10.0}
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

SPEC: dict[str, dict[str, Any]] = {
    "transformer": {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 64,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 128,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 16, 16],
        "norm_num_groups": 8,
        "layers_per_block": 1,
        "sample_size": 256,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 1024,
        "hidden_act": "quick_gelu",
    },
    "t5": {
        "d_model": 4096,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 1,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
}


def bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def clip_tokenizer():
    """Byte-level CLIP BPE with every byte (and byte + </w>) and no merges."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *CLIP_SPECIALS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer():
    """Unigram T5 tokenizer over lowercase/uppercase letters, digits and punctuation."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [ch, "▁" + ch]
    return T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0)


def clip_encoder(vocab_size: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    bos, eos = vocab_size - 2, vocab_size - 1
    config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **SPEC["clip"]
    )
    return CLIPTextModelWithProjection(config).eval()


def t5_encoder(vocab_size: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **SPEC["t5"])
    return T5EncoderModel(config).eval()


def sincos_pos_embed(dim: int, grid: int, base: int) -> list[float]:
    """diffusers' 2D sin-cos table in pure Python: torch's vectorised sin can differ in the last bit between runs."""
    omega = [1.0 / 10000 ** (i / (dim // 4)) for i in range(dim // 4)]
    values = []
    for h in range(grid):
        for w in range(grid):
            for pos in (w * base / grid, h * base / grid):
                values += [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]
    return values


def tiny_transformer(seed: int):
    import torch
    from diffusers import SD3Transformer2DModel

    spec = SPEC["transformer"]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**spec)
    hidden = spec["num_attention_heads"] * spec["attention_head_dim"]
    table = sincos_pos_embed(hidden, spec["pos_embed_max_size"], spec["sample_size"] // spec["patch_size"])
    buffer = model.pos_embed.pos_embed
    buffer.copy_(torch.tensor(table, dtype=torch.float64).reshape(buffer.shape))
    return model


@dataclass(frozen=True)
class VaeData:
    """The VAE's training images: a raw uint8 file of count x size x size x 3 RGB pixels."""

    path: Path | None
    size: int
    steps: int

    def recipe(self) -> dict[str, Any]:
        """What the trained VAE depends on (recorded in the marker; another recipe is another model)."""
        if self.steps == 0 or self.path is None:
            return {"steps": 0}
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"steps": self.steps, "images_sha256": digest, "image_size": self.size, "threads": THREADS,
                **VAE_TRAINING}

    def load(self):
        """The images as a float tensor in [-1, 1], N x 3 x size x size."""
        import torch

        raw = torch.frombuffer(bytearray(self.path.read_bytes()), dtype=torch.uint8)
        return raw.reshape(-1, self.size, self.size, 3).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr_db(vae, images) -> float:
    """Peak signal-to-noise ratio of encode -> decode (posterior mode) on images in [-1, 1]."""
    import torch

    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return 10 * math.log10(4 / (decoded - images).pow(2).mean().item())


def train_vae(vae, images, steps: int, seed: int) -> None:
    """Seeded AdamW (one-cycle LR) on L1 + MSE of sampled reconstructions plus a small KL term.

    The log-variance starts near zero variance so that the sampled latents the
    trainer caches are nearly the posterior mean from the first step.
    """
    import torch

    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = VAE_TRAINING["initial_logvar"]
    optimiser = torch.optim.AdamW(vae.parameters(), lr=VAE_TRAINING["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=VAE_TRAINING["lr"], total_steps=steps,
                                                   pct_start=VAE_TRAINING["warmup_fraction"])
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (VAE_TRAINING["batch_size"],), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        error = vae.decode(posterior.sample(generator=generator)).sample - batch
        loss = error.abs().mean() + error.pow(2).mean() + VAE_TRAINING["kl_weight"] * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    vae.eval()


def set_latent_statistics(vae, images) -> None:
    """scaling_factor = 1 / std and shift_factor = mean of the posterior means of images."""
    import torch

    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))


def tiny_vae(seed: int, data: VaeData) -> tuple[Any, float | None]:
    """The VAE and its held-out PSNR (None when untrained), trained deterministically on THREADS threads."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**SPEC["vae"])
    if data.steps == 0:
        return vae, None
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        images = data.load()
        train, held_out = images[:-HELD_OUT], images[-HELD_OUT:]
        train_vae(vae, train, data.steps, seed)
        set_latent_statistics(vae, train[:256])
        return vae, psnr_db(vae, held_out)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def build_pipeline(seed: int, data: VaeData):
    """The pipeline and the VAE's held-out PSNR."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok, tok_3 = clip_tokenizer(), t5_tokenizer()
    transformer = tiny_transformer(seed)
    vae, psnr = tiny_vae(seed + 1, data)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SPEC["scheduler"]),
        vae=vae,
        text_encoder=clip_encoder(len(tok), seed + 2),
        tokenizer=tok,
        text_encoder_2=clip_encoder(len(tok), seed + 3),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(len(tok_3), seed + 4),
        tokenizer_3=tok_3,
    )
    return pipe, psnr


def recorded(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def recipe(seed: int, data: VaeData) -> dict[str, Any]:
    """Everything the folder's bytes depend on besides library versions and the CPU."""
    script = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return {"format": FORMAT, "seed": seed, "spec": SPEC, "vae_training": data.recipe(), "script_sha256": script}


def set_aside(out: Path) -> Path:
    """Rename an outdated tiny SD3 to the first free <name>.previous-N beside it."""
    n = 1
    while out.with_name(f"{out.name}.previous-{n}").exists():
        n += 1
    aside = out.with_name(f"{out.name}.previous-{n}")
    os.rename(out, aside)
    return aside


def check_replaceable(out: Path, seed: int) -> bool:
    """Whether out holds an older tiny SD3 of this seed (to set aside); refuse anything else but a missing/empty folder."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    found = recorded(out)
    if not found or found.get("seed") != seed:
        raise SystemExit(f"error: {out} exists and is not a tiny SD3 built with seed {seed}; refusing to overwrite it")
    return True


def build(out: Path, seed: int, data: VaeData) -> str:
    """Write the pipeline to out atomically; return the one-line summary."""
    start = time.monotonic()
    wanted = recipe(seed, data)
    found = recorded(out) if out.exists() else None
    if found and {k: found.get(k) for k in wanted} == wanted:
        return f"tiny SD3 already at {out} ({folder_mb(out):.1f} MB, seed {seed}, {time.monotonic() - start:.1f} s)"
    outdated = check_replaceable(out, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe, psnr = build_pipeline(seed, data)
        pipe.save_pretrained(tmp, safe_serialization=True)
        marker = {**wanted, "vae_psnr_db": None if psnr is None else round(psnr, 2)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        aside = f"; the older build (another recipe) is kept at {set_aside(out)}" if outdated else ""
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    vae = "random VAE" if psnr is None else f"VAE {psnr:.1f} dB PSNR on {HELD_OUT} held-out images"
    return (f"tiny SD3 built at {out} ({folder_mb(out):.1f} MB, seed {seed}, {vae}, "
            f"{time.monotonic() - start:.1f} s){aside}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="pipeline folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=0, help="VAE training steps (0: a random VAE)")
    parser.add_argument("--vae-images", type=Path, default=None, help="raw uint8 RGB images, N x size x size x 3")
    parser.add_argument("--vae-image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.vae_steps and args.vae_images is None:
        parser.error("--vae-steps needs --vae-images")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = VaeData(args.vae_images, args.vae_image_size, args.vae_steps)
    print(build(args.out.resolve(), args.seed, data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
