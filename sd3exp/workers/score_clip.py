"""CLIP-T, CLIP-I and DINO-I for rendered cells, from local model folders only.

Standalone worker, run by the trainer venv's python (torch, transformers, numpy);
sd3exp never imports it. Usage: score_clip.py JOB.json OUT.json

The job (JSON): clip / dino (a local model folder or null), digests ({clip, dino}: the
model's content digest, keys the cache), cache_dir, training
({concept id: [{path, sha256}]}), cells ([{id, image, prompt, concepts: [ids]}]).
OUT.json gets {"cells": {id: {clip_t, clip_i, clip_max, dino_i, dino_max}}}:
- clip_t: 100 x max(cosine(image, text), 0), torchmetrics' CLIPScore convention;
- clip_i / dino_i: the mean cosine between the render's embedding and each training
  image's (DreamBooth's CLIP-I and DINO); *_max the highest single one.
Training-image embeddings are cached in cache_dir/<model digest>/<image sha256>.npy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor


def normed(x: Any) -> torch.Tensor:
    """Unit vectors; CLIP's get_*_features return a tensor (transformers 4) or an output whose
    pooler_output holds the projected features (transformers 5)."""
    x = getattr(x, "pooler_output", x)
    return x / x.norm(p=2, dim=-1, keepdim=True)


def rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class Clip:
    def __init__(self, folder: Path) -> None:
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def image(self, path: str) -> np.ndarray:
        pixels = self.processor(images=[rgb(path)], return_tensors="pt")["pixel_values"]
        return normed(self.model.get_image_features(pixel_values=pixels))[0].numpy()

    @torch.no_grad()
    def text(self, prompt: str) -> np.ndarray:
        tokens = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return normed(features)[0].numpy()


class Dino:
    def __init__(self, folder: Path) -> None:
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def image(self, path: str) -> np.ndarray:
        out = self.model(pixel_values=self.processor(images=[rgb(path)], return_tensors="pt")["pixel_values"])
        cls = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return normed(cls)[0].numpy()


def training_embeddings(embed: Callable[[str], np.ndarray], images: List[Dict[str, str]], cache: Path) -> np.ndarray:
    """One row per training image, read from / written to the cache keyed by content hash."""
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for image in images:
        path = cache / f"{image['sha256']}.npy"
        if path.is_file():
            rows.append(np.load(path))
            continue
        row = embed(image["path"])
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, row)
        tmp.replace(path)
        rows.append(row)
    return np.stack(rows)


def fidelity(render: np.ndarray, training: np.ndarray) -> tuple[float, float]:
    """(mean, max) cosine of a unit embedding to unit training embeddings."""
    cos = training @ render
    return float(cos.mean()), float(cos.max())


def score(job: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    out: Dict[str, Dict[str, float]] = {str(c["id"]): {} for c in job["cells"]}
    for kind, cls in (("clip", Clip), ("dino", Dino)):
        if not job.get(kind):
            continue
        folder = Path(job[kind])
        model = cls(folder)
        cache = Path(job["cache_dir"]) / f"{kind}-{job['digests'][kind]}"
        sets = {cid: training_embeddings(model.image, images, cache) for cid, images in job["training"].items()}
        for cell in job["cells"]:
            emb = model.image(cell["image"])
            scores = out[str(cell["id"])]
            if kind == "clip":
                scores["clip_t"] = float(100.0 * max(float(emb @ model.text(cell["prompt"])), 0.0))
            if cell["concepts"]:
                pool = np.concatenate([sets[cid] for cid in cell["concepts"]])
                scores[f"{kind}_i"], scores[f"{kind}_max"] = fidelity(emb, pool)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    result = {"cells": score(json.loads(args.job.read_text(encoding="utf-8")))}
    args.out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
