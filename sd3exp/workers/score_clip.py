"""CLIP-T, CLIP-I, DINO-I, PickScore, aesthetic and HPSv2.1 for rendered cells, from local models only.

Standalone worker, run by the trainer venv's python (torch, transformers, open_clip, numpy);
sd3exp never imports it. Usage: score_clip.py JOB.json OUT.json

The job (JSON): the models (a local path or null each): clip, dino (folders), pickscore and
pickscore_processor (folders), aesthetic (the MLP head's file) and aesthetic_clip (a CLIP
ViT-L/14 folder), hps (an HPSv2.1 checkpoint file; open_clip ViT-H-14 unless an
open_clip_config.json lies beside it); digests ({model key: content digest}, keys the cache),
cache_dir, training and holdout ({concept id: [{path, sha256}]}), cells ([{id, image, prompt,
concepts: [ids]}]), check (true: only load every model and report what fails).
OUT.json gets {"cells": {id: {measure: value}}} (or {"errors": {model key: message}} for a check):
- clip_t: 100 x max(cosine(image, text), 0), torchmetrics' CLIPScore convention;
- clip_i / dino_i: the mean cosine between the render's embedding and each training image's
  (DreamBooth's CLIP-I and DINO; DINO's embedding is its CLS token); *_max the highest single one;
  holdout_clip / holdout_dino: the same against the held-out images;
- pickscore: logit_scale.exp() x cosine of PickScore's image and text embeddings (its README);
- aesthetic: the LAION aesthetic predictor v2's MLP on the L2-normalised CLIP ViT-L/14 image embedding;
- hps: 100 x HPSv2.1's score (cosine of open_clip's normalised image and text features).
Training-image embeddings are cached in cache_dir/<kind>-<model digest>/<image sha256>.npy.
A model whose checkpoint lacks weights it needs is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image


class Refused(Exception):
    """A model that cannot be used as configured."""


def normed(x: Any) -> torch.Tensor:
    """Unit vectors; CLIP's get_*_features return a tensor (transformers 4) or an output whose
    pooler_output holds the projected features (transformers 5)."""
    x = getattr(x, "pooler_output", x)
    return x / x.norm(p=2, dim=-1, keepdim=True)


def rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pretrained(cls: Any, folder: str, unused: tuple = ()) -> Any:
    """cls.from_pretrained(folder), refused when the checkpoint lacks weights the model uses
    (transformers would initialise them at random); `unused`: prefixes of weights never used here."""
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(unused)]
    if missing:
        raise Refused(f"{folder}: the checkpoint has no weights for {len(missing)} parameter(s) "
                      f"({', '.join(sorted(missing)[:4])}); they would be random")
    return model.eval()


class Clip:
    """A CLIPModel and its processor (CLIP-T / CLIP-I, PickScore with the CLIP-H processor)."""

    def __init__(self, folder: str, processor: Optional[str] = None) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.model = pretrained(CLIPModel, folder)
        self.processor = AutoProcessor.from_pretrained(processor or folder, local_files_only=True)

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

    def pickscore(self, image: np.ndarray, prompt: str) -> float:
        return float(self.model.logit_scale.exp()) * float(image @ self.text(prompt))


class Dino:
    def __init__(self, folder: str) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.model = pretrained(AutoModel, folder, unused=("pooler.",))  # the CLS token, not a pooler
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def image(self, path: str) -> np.ndarray:
        out = self.model(pixel_values=self.processor(images=[rgb(path)], return_tensors="pt")["pixel_values"])
        return normed(out.last_hidden_state[:, 0])[0].numpy()


class Aesthetic:
    """LAION's improved aesthetic predictor (v2): an MLP on a normalised CLIP ViT-L/14 image embedding."""

    def __init__(self, head: str, clip: Clip) -> None:
        state = load_weights(head)
        width = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else None
        if width != clip.model.config.projection_dim:
            raise Refused(f"{head}: the head takes {width}-wide embeddings, the CLIP model gives "
                          f"{clip.model.config.projection_dim} (the predictor needs CLIP ViT-L/14: 768)")
        nn = torch.nn
        self.head = nn.Module()
        self.head.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        load_strict(self.head, state, head)
        self.head.eval()
        self.clip = clip

    @torch.no_grad()
    def score(self, embedding: np.ndarray) -> float:
        return float(self.head.layers(torch.from_numpy(embedding).float()[None])[0, 0])


class Hps:
    """HPSv2.1: open_clip ViT-H-14 with HPS's weights; images resized longest side to the model's size and padded."""

    def __init__(self, checkpoint: str) -> None:
        import open_clip
        from open_clip.transform import image_transform

        beside = Path(checkpoint).with_name("open_clip_config.json")
        cfg = json.loads(beside.read_text())["model_cfg"] if beside.is_file() else open_clip.get_model_config("ViT-H-14")
        self.model = open_clip.CLIP(**cfg)
        state = load_weights(checkpoint)
        load_strict(self.model, state.get("state_dict", state), checkpoint)
        self.model.eval()
        size = self.model.visual.image_size
        self.transform = image_transform(size[0] if isinstance(size, (tuple, list)) else size, is_train=False,
                                         resize_mode="longest", fill_color=0)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.model.context_length)

    @torch.no_grad()
    def score(self, path: str, prompt: str) -> float:
        image = self.model.encode_image(self.transform(rgb(path))[None], normalize=True)
        text = self.model.encode_text(self.tokenizer([prompt]), normalize=True)
        return 100.0 * float((image @ text.T)[0, 0])


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load `state` into `module`, refused when weights are missing or do not fit."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise Refused(f"{path}: {len(missing)} weight(s) missing ({', '.join(missing[:4])}), "
                      f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}) for this model")


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


def load(job: Dict[str, Any]) -> Dict[str, Any]:
    """Every model the job names, by key; Refused or the loader's error for the first that fails."""
    loaded: Dict[str, Any] = {}
    if job.get("clip"):
        loaded["clip"] = Clip(job["clip"])
    if job.get("dino"):
        loaded["dino"] = Dino(job["dino"])
    if job.get("pickscore"):
        loaded["pickscore"] = Clip(job["pickscore"], job.get("pickscore_processor"))
    if job.get("aesthetic"):
        same = job.get("aesthetic_clip") == job.get("clip") and "clip" in loaded
        loaded["aesthetic"] = Aesthetic(job["aesthetic"], loaded["clip"] if same else Clip(job["aesthetic_clip"]))
    if job.get("hps"):
        loaded["hps"] = Hps(job["hps"])
    return loaded


def check(job: Dict[str, Any]) -> Dict[str, str]:
    """{model key: why it cannot be loaded} for each model of the job."""
    errors = {}
    for key in ("clip", "dino", "pickscore", "aesthetic", "hps"):
        if job.get(key):
            try:
                load({k: v for k, v in job.items() if k in (key, f"{key}_processor", f"{key}_clip")})
            except Exception as err:  # noqa: BLE001 - any loader failure is reported, by model
                errors[key] = f"{type(err).__name__}: {err}"
    return errors


def score(job: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    out: Dict[str, Dict[str, float]] = {str(c["id"]): {} for c in job["cells"]}
    models = load(job)
    for kind in ("clip", "dino"):
        if kind not in models:
            continue
        model = models[kind]
        cache = Path(job["cache_dir"]) / f"{kind}-{job['digests'][kind]}"
        sets = {cid: training_embeddings(model.image, images, cache) for cid, images in job["training"].items()}
        held = {cid: training_embeddings(model.image, images, cache)
                for cid, images in job.get("holdout", {}).items() if images}
        for cell in job["cells"]:
            emb = model.image(cell["image"])
            scores = out[str(cell["id"])]
            if kind == "clip":
                scores["clip_t"] = float(100.0 * max(float(emb @ model.text(cell["prompt"])), 0.0))
            if cell["concepts"]:
                pool = np.concatenate([sets[cid] for cid in cell["concepts"]])
                scores[f"{kind}_i"], scores[f"{kind}_max"] = fidelity(emb, pool)
            unseen = [held[cid] for cid in cell["concepts"] if cid in held]
            if unseen:
                scores[f"holdout_{kind}"] = fidelity(emb, np.concatenate(unseen))[0]
    for cell in job["cells"]:
        scores = out[str(cell["id"])]
        if "pickscore" in models:
            pick = models["pickscore"]
            scores["pickscore"] = pick.pickscore(pick.image(cell["image"]), cell["prompt"])
        if "aesthetic" in models:
            scores["aesthetic"] = models["aesthetic"].score(models["aesthetic"].clip.image(cell["image"]))
        if "hps" in models:
            scores["hps"] = models["hps"].score(cell["image"], cell["prompt"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    job = json.loads(args.job.read_text(encoding="utf-8"))
    result = {"errors": check(job)} if job.get("check") else {"cells": score(job)}
    args.out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
