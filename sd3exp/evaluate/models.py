"""Model-based measures (CLIP-T, CLIP-I, DINO-I, PickScore, aesthetic, HPSv2.1) through
sd3exp/workers/score_clip.py in the trainer venv.

Models come from eval.scoring.*: a local folder or file, or a Hugging Face repo id (a file in it:
repo_id/filename) already in the user's Hugging Face cache; nothing is ever downloaded
(HF_HUB_OFFLINE=1). They are checked (folder, config.json, kind of model) and then loaded once by
the worker before any rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from sd3exp.errors import ConfigError, EvalError
from sd3exp.io import read_json, user_cache, write_json, write_text
from sd3exp.project import WORKERS
from sd3exp.schema import ScoringConfig
from sd3exp.tinymodel import OFFLINE_ENV

WORKER = WORKERS / "score_clip.py"
KINDS: Dict[str, tuple] = {  # key -> (config.json model_type values accepted, what is needed)
    "clip": (("clip",), "a CLIP model with image and text towers (CLIPModel, e.g. openai/clip-vit-large-patch14)"),
    "dino": (("dinov2", "dinov2_with_registers", "vit"), "a DINO image model (e.g. facebook/dinov2-base)"),
}
EXAMPLE = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base",
           "pickscore": "yuvalkirstain/PickScore_v1", "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
           "aesthetic_clip": "openai/clip-vit-large-patch14"}
KINDS.update({
    "pickscore": (("clip",), "PickScore, a CLIPModel (yuvalkirstain/PickScore_v1)"),
    "pickscore_processor": (None, "the CLIP-H processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "aesthetic_clip": (("clip",), "a CLIP ViT-L/14 (CLIPModel, openai/clip-vit-large-patch14)"),
})
FILES = {  # key -> (Hugging Face repo, file name, what it is)
    "aesthetic": ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth",
                  "the LAION aesthetic predictor v2's MLP head"),
    "hps": ("xswu/HPSv2", "HPS_v2.1_compressed.pt", "the HPSv2.1 checkpoint"),
}


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
    if key in FILES:
        repo, name, _ = FILES[key]
        local = f"/models/{repo.split('/')[1]}"
        return (f"fetch it once (`hf download {repo} {name} --local-dir {local}`), then "
                f"eval.scoring.{key}={local}/{name}, or leave eval.scoring.{key} unset")
    name = EXAMPLE[key]
    return (f"point eval.scoring.{key} at a local model folder holding config.json and the weights (fetch one once, "
            f"e.g. `hf download {name} --local-dir /models/{name.split('/')[1]}`, then "
            f"eval.scoring.{key}=/models/{name.split('/')[1]}), or leave eval.scoring.{key} unset")


def model_folder(key: str, value: str) -> Path:
    """The checked folder of eval.scoring.<key>: it exists, is readable and holds a model of the right kind."""
    field = f"eval.scoring.{key}"
    folder = Path(value).expanduser()
    if not folder.is_dir():
        snapshot = hf_cache_snapshot(value) if value.count("/") == 1 else None
        if snapshot is None:
            raise ConfigError(field, value, "no such folder (nor a model in the Hugging Face cache); sd3exp never "
                              "downloads models", _fix(key))
        folder = snapshot
    accepted, wanted = KINDS[key]
    if accepted is None:  # a processor: checked when the worker loads it
        return folder.resolve()
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(field, value, f"cannot read a model's config.json there ({err})", _fix(key)) from err
    if model_type not in accepted:
        raise ConfigError(field, value, f"its config.json says model_type {model_type!r}; this needs {wanted}",
                          _fix(key))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(field, value, "no weights (*.safetensors or *.bin) in the folder", _fix(key))
    return folder.resolve()


def model_file(key: str, value: str) -> Path:
    """The checked file of eval.scoring.<key> (a path, or repo_id/filename in the Hugging Face cache)."""
    path = Path(value).expanduser()
    if not path.is_file() and value.count("/") == 2 and not value.startswith(("/", ".", "~")):
        repo, name = value.rsplit("/", 1)
        snapshot = hf_cache_snapshot(repo)
        path = snapshot / name if snapshot is not None else path
    if not path.is_file():
        raise ConfigError(f"eval.scoring.{key}", value, f"no such file (nor one in the Hugging Face cache); it should "
                          f"be {FILES[key][2]}; sd3exp never downloads models", _fix(key))
    return path.resolve()


def _hash_cache() -> Path:
    return user_cache() / "file-hashes.json"


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


def scoring_models(sc: ScoringConfig) -> Dict[str, Path]:
    """Every model eval.scoring asks for, checked: {key: folder or file}. The aesthetic predictor's
    CLIP defaults to eval.scoring.clip, PickScore's processor to the PickScore folder."""
    found = configured(sc.clip, sc.dino)
    if sc.pickscore:
        found["pickscore"] = model_folder("pickscore", sc.pickscore)
        found["pickscore_processor"] = model_folder("pickscore_processor", sc.pickscore_processor or sc.pickscore)
    if sc.aesthetic:
        found["aesthetic"] = model_file("aesthetic", sc.aesthetic)
        aesthetic_clip = sc.aesthetic_clip or sc.clip
        if not aesthetic_clip:
            raise ConfigError("eval.scoring.aesthetic_clip", None, "the aesthetic predictor needs a CLIP ViT-L/14",
                              _fix("aesthetic_clip"))
        found["aesthetic_clip"] = model_folder("aesthetic_clip", aesthetic_clip)
    if sc.hps:
        found["hps"] = model_file("hps", sc.hps)
    return found


def check_loading(found: Mapping[str, Path], python: Path, cache: Path, timeout_s: float) -> None:
    """Load every model once in the worker before rendering; ConfigError naming the first that fails.
    A set of models that loaded is remembered (by content digest) and not loaded again."""
    import tempfile

    digests = {key: model_digest(path) for key, path in sorted(found.items())}
    marker = cache / "loaded" / hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]
    if not found or marker.is_file():
        return
    with tempfile.TemporaryDirectory(prefix="sd3exp-score-check-") as tmp:
        job = {**{key: str(path) for key, path in found.items()}, "check": True}
        try:
            errors = run_worker(job, python, Path(tmp), timeout_s, "errors")
        except (OSError, subprocess.SubprocessError, KeyError, ValueError) as err:
            lines = "\n  ".join(tail(Path(tmp) / "score.log"))
            raise EvalError(f"the scoring worker could not load the models ({err}):\n  {lines}") from err
    for key, problem in errors.items():
        raise ConfigError(f"eval.scoring.{key}", str(found[key]), f"cannot be loaded ({problem})", _fix(key))
    try:
        write_text(marker, json.dumps(digests))
    except OSError:
        pass  # only a speed-up: the models loaded


def cache_dir(configured: Optional[str]) -> Path:
    """eval.scoring.cache_dir, or ~/.cache/sd3exp/embeddings (XDG_CACHE_HOME respected)."""
    if configured:
        return Path(configured).expanduser()
    return user_cache() / "embeddings"


def make_job(folders: Mapping[str, Path], training: Mapping[str, Sequence[tuple]],
             cells: Sequence[dict], cache: Path, holdout: Optional[Mapping[str, Sequence[tuple]]] = None) -> dict:
    """The worker's job: training / holdout = {concept id: [(path, sha256)]}, cells = [{id, image, prompt,
    concepts}]."""
    def images(sets: Mapping[str, Sequence[tuple]]) -> dict:
        return {cid: [{"path": str(p), "sha256": d} for p, d in found] for cid, found in sets.items()}

    return {"clip": str(folders["clip"]) if "clip" in folders else None,
            "dino": str(folders["dino"]) if "dino" in folders else None,
            **{k: str(f) for k, f in folders.items() if k not in ("clip", "dino")},
            "digests": {k: model_digest(f) for k, f in folders.items()}, "cache_dir": str(cache),
            "training": images(training), "holdout": images(holdout or {}), "cells": list(cells)}


def run_worker(job: dict, python: Path, work_dir: Path, timeout_s: float, part: str = "cells") -> Dict[str, Any]:
    """Scores by cell id (or a check's errors by model: part="errors"); raises subprocess/OS errors
    to the caller, the worker's output in work_dir/score.log."""
    job_path, out_path, log_path = work_dir / "score-job.json", work_dir / "score-result.json", work_dir / "score.log"
    write_json(job_path, job)
    with open(log_path, "w", encoding="utf-8") as log:
        subprocess.run([str(python), str(WORKER), str(job_path), str(out_path)], stdin=subprocess.DEVNULL,
                       stdout=log, stderr=log, env={**os.environ, **OFFLINE_ENV}, timeout=timeout_s, check=True)
    return read_json(out_path)[part]


def tail(path: Path, lines: int = 8) -> List[str]:
    return path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:] if path.is_file() else []
