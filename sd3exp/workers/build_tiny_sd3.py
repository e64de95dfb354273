"""Build a seeded, randomly initialised tiny SD3 diffusers pipeline folder.

Standalone: run it with the trainer venv's python (torch, diffusers,
transformers), never import it from sd3exp. Nothing is downloaded: the
tokenizers are built from small local vocabularies. The transformer has the
shapes ComfyUI infers SD3 from (hidden 64 x depth, heads = depth), the two
CLIP encoders project to 1024 each (pooled 2048) and the T5 encoder has
d_model 4096, so the pipeline trains in SimpleTuner and loads in ComfyUI.

    python build_tiny_sd3.py OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARKER = "tiny_sd3.json"
FORMAT = 1
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


def build_pipeline(seed: int):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok, tok_3 = clip_tokenizer(), t5_tokenizer()
    transformer = tiny_transformer(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SPEC["vae"])
    return StableDiffusion3Pipeline(
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


def recorded(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def build(out: Path, seed: int) -> str:
    """Write the pipeline to out atomically; return the one-line summary."""
    start = time.monotonic()
    wanted = {"format": FORMAT, "seed": seed, "spec": SPEC}
    if out.exists() and recorded(out) == wanted:
        return f"tiny SD3 already at {out} ({folder_mb(out):.1f} MB, seed {seed}, {time.monotonic() - start:.1f} s)"
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SystemExit(f"error: {out} exists and is not a tiny SD3 built with seed {seed}; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"tiny SD3 built at {out} ({folder_mb(out):.1f} MB, seed {seed}, {time.monotonic() - start:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="pipeline folder to create")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build(args.out.resolve(), args.seed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
