"""CLIP-T, CLIP-I, DINO-I through sd3exp/workers/score_clip.py in the trainer venv.

Model folders come from eval.scoring.clip / eval.scoring.dino: a local folder, or a Hugging
Face repo id already in the user's Hugging Face cache; nothing is ever downloaded
(HF_HUB_OFFLINE=1). They are checked (folder, config.json, kind of model) before any
rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from sd3exp.errors import ConfigError
from sd3exp.io import read_json, write_json
from sd3exp.project import WORKERS
from sd3exp.tinymodel import OFFLINE_ENV

WORKER = WORKERS / "score_clip.py"
KINDS: Dict[str, tuple] = {  # key -> (config.json model_type values accepted, what is needed)
    "clip": (("clip",), "a CLIP model with image and text towers (CLIPModel, e.g. openai/clip-vit-large-patch14)"),
    "dino": (("dinov2", "dinov2_with_registers", "vit"), "a DINO image model (e.g. facebook/dinov2-base)"),
}
EXAMPLE = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"}


def hf_cache_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot of `repo_id` (refs/main) in the Hugging Face cache, if there is one."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    return None


def _fix(key: str) -> str:
    name = EXAMPLE[key]
    return (f"point eval.scoring.{key} at a local model folder holding config.json and the weights (fetch one once, "
            f"e.g. `hf download {name} --local-dir /models/{name.split('/')[1]}`, then "
            f"eval.scoring.{key}=/models/{name.split('/')[1]}), or leave eval.scoring.{key} unset")


def model_folder(key: str, value: str) -> Path:
    """The checked folder of eval.scoring.<key>: it exists, is readable and holds a model of the right kind."""
    field = f"eval.scoring.{key}"
    folder = Path(value).expanduser()
    if not folder.is_dir():
        folder = hf_cache_snapshot(value) if value.count("/") == 1 else None
        if folder is None:
            raise ConfigError(field, value, "no such folder (nor a model in the Hugging Face cache); sd3exp never "
                              "downloads models", _fix(key))
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(field, value, f"cannot read a model's config.json there ({err})", _fix(key)) from err
    accepted, wanted = KINDS[key]
    if model_type not in accepted:
        raise ConfigError(field, value, f"its config.json says model_type {model_type!r}; this needs {wanted}",
                          _fix(key))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(field, value, "no weights (*.safetensors or *.bin) in the folder", _fix(key))
    return folder.resolve()


def _hash_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3exp" / "file-hashes.json"


def content_hashes(paths: Sequence[Path]) -> List[str]:
    """sha256 of each file's content; kept in ~/.cache/sd3exp/file-hashes.json by path, size and mtime so
    an unchanged multi-gigabyte model is not read again."""
    cache_path = _hash_cache()
    try:
        cache = read_json(cache_path) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    hashes, changed = [], False
    for path in paths:
        real = path.resolve()
        stat = real.stat()
        key, stamp = str(real), f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            digest = hashlib.sha256()
            with open(real, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            entry = cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
            changed = True
        hashes.append(entry["sha256"])
    if changed:
        try:
            write_json(cache_path, cache)
        except OSError:
            pass  # only a speed-up: the hashes were computed
    return hashes


def model_digest(model: Path) -> str:
    """Digest of a model by content: every file of the folder (config, weights, processor, tokenizer)
    or the one file, by name and sha256."""
    files = sorted(p for p in model.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if model.is_dir() else [model]
    h = hashlib.sha256()
    for path, digest in zip(files, content_hashes(files)):
        h.update(f"{path.name}:{digest}\n".encode())
    return h.hexdigest()[:16]


def configured(clip: Optional[str], dino: Optional[str]) -> Dict[str, Path]:
    """The model folders asked for, checked."""
    return {key: model_folder(key, value) for key, value in (("clip", clip), ("dino", dino)) if value}


def cache_dir(configured: Optional[str]) -> Path:
    """eval.scoring.cache_dir, or ~/.cache/sd3exp/embeddings (XDG_CACHE_HOME respected)."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3exp" / "embeddings"


def make_job(folders: Mapping[str, Path], training: Mapping[str, Sequence[tuple]],
             cells: Sequence[dict], cache: Path) -> dict:
    """The worker's job: training = {concept id: [(path, sha256)]}, cells = [{id, image, prompt, concepts}]."""
    return {"clip": str(folders["clip"]) if "clip" in folders else None,
            "dino": str(folders["dino"]) if "dino" in folders else None,
            "digests": {k: model_digest(f) for k, f in folders.items()}, "cache_dir": str(cache),
            "training": {cid: [{"path": str(p), "sha256": d} for p, d in images] for cid, images in training.items()},
            "cells": list(cells)}


def run_worker(job: dict, python: Path, work_dir: Path, timeout_s: float) -> Dict[str, Dict[str, float]]:
    """Scores by cell id; raises subprocess/OS errors to the caller with the log's path."""
    job_path, out_path, log_path = work_dir / "score-job.json", work_dir / "score-result.json", work_dir / "score.log"
    write_json(job_path, job)
    with open(log_path, "w", encoding="utf-8") as log:
        subprocess.run([str(python), str(WORKER), str(job_path), str(out_path)], stdin=subprocess.DEVNULL,
                       stdout=log, stderr=log, env={**os.environ, **OFFLINE_ENV}, timeout=timeout_s, check=True)
    return read_json(out_path)["cells"]


def tail(path: Path, lines: int = 8) -> List[str]:
    return path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:] if path.is_file() else []
