"""Tiny random CLIP, DINOv2 and text-only CLIP models, and reference scores, for tests (trainer venv).

`tiny_clip.py build OUT`: OUT/clip (CLIPModel + CLIPProcessor), OUT/dino (Dinov2Model + image
processor), OUT/text-only (CLIPTextModel), all random, nothing downloaded.
`tiny_clip.py reference JOB.json OUT.json`: for each cell of a score_clip job, torchmetrics'
CLIPScore of the image and prompt, and CLIP / DINO cosines computed directly (no sd3exp code).
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build(out: Path) -> None:
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextModel,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    (out / "tok").mkdir(parents=True, exist_ok=True)
    (out / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (out / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "tok" / "vocab.json"), str(out / "tok" / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(out / "clip")
    pixels = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=CLIPImageProcessor(**pixels), tokenizer=tokenizer).save_pretrained(out / "clip")
    CLIPTextModel(config.text_config).save_pretrained(out / "text-only")
    tokenizer.save_pretrained(out / "text-only")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4)).save_pretrained(out / "dino")
    BitImageProcessor(**pixels).save_pretrained(out / "dino")


class Features(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns an output whose
    pooler_output is that tensor. This adapter gives torchmetrics what it expects; the rest is its own code."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.inner.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = self.inner.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


@torch.no_grad()
def reference(job: dict) -> dict:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    clip, proc = CLIPModel.from_pretrained(job["clip"]).eval(), CLIPProcessor.from_pretrained(job["clip"])
    metric = CLIPScore(model_name_or_path=lambda: (Features(clip), proc))  # a local model: torchmetrics' callable form
    dino, dproc = AutoModel.from_pretrained(job["dino"]).eval(), AutoImageProcessor.from_pretrained(job["dino"])

    def rgb(path):
        return Image.open(path).convert("RGB")

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    def clip_emb(path):
        out = clip.get_image_features(pixel_values=proc(images=[rgb(path)], return_tensors="pt")["pixel_values"])
        return unit(getattr(out, "pooler_output", out))[0]

    def dino_emb(path):
        return unit(dino(pixel_values=dproc(images=[rgb(path)], return_tensors="pt")["pixel_values"]).pooler_output)[0]

    out = {}
    for cell in job["cells"]:
        image = torch.from_numpy(np.asarray(rgb(cell["image"]))).permute(2, 0, 1)
        metric.reset()
        training = [t["path"] for cid in cell["concepts"] for t in job["training"][cid]]
        clip_cos = [float(clip_emb(cell["image"]) @ clip_emb(t)) for t in training]
        dino_cos = [float(dino_emb(cell["image"]) @ dino_emb(t)) for t in training]
        out[str(cell["id"])] = {"clip_t": float(metric(image, cell["prompt"])),
                                "clip_i": sum(clip_cos) / len(clip_cos), "dino_i": sum(dino_cos) / len(dino_cos)}
    return out


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        Path(sys.argv[3]).write_text(json.dumps(reference(json.loads(Path(sys.argv[2]).read_text()))))
