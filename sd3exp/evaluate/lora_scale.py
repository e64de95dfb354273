"""The strength a LoRA checkpoint must be rendered at: the scale it was trained with, alpha / rank.

Where that scale is written differs between SimpleTuner's files and is read
differently by each backend (checked against SimpleTuner 4.10.1, diffusers and
ComfyUI's comfy/weight_adapter/lora.py):
- `checkpoint-N/pytorch_lora_weights.safetensors` (lora.format=diffusers) keeps
  alpha and rank only in its safetensors metadata (`lora_adapter_metadata`,
  keys `transformer.lora_alpha`, `transformer.r`); the final
  `pytorch_lora_weights.safetensors` has no metadata at all;
- lora.format=comfyui adds `<module>.alpha` tensors.
diffusers honours the metadata (and not an absent one); ComfyUI ignores the
metadata and patches W + strength x (alpha / rank if `.alpha` tensors exist,
else 1) x B·A. So every column is given the trained scale explicitly: the
diffusers worker loads the bare tensors with that scale, and ComfyUI's
LoraLoaderModelOnly gets strength_model = trained scale / the scale the file's
own `.alpha` tensors already apply.

Only the safetensors header and the `.alpha` scalars are read (stdlib: the
project environment has no torch).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import Checkpoint

METADATA_KEY = "lora_adapter_metadata"
_SCALARS = {"F32": "<f", "F64": "<d", "F16": "<e"}
_MAX_HEADER = 100_000_000


def read_header(path: Path) -> Tuple[int, Dict[str, str], Dict[str, Any]]:
    """(header size, metadata, tensor table) of a safetensors file: 8-byte little-endian size, then JSON."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise EvalError(f"{path}: not a readable safetensors file ({exc}); is the checkpoint complete?") from exc
    metadata = header.pop("__metadata__", None) or {}
    return size, metadata, header


def _scalar(path: Path, header_size: int, info: Dict[str, Any]) -> float:
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + header_size + begin)
        data = f.read(end - begin)
    if info["dtype"] == "BF16":
        return struct.unpack("<f", b"\0\0" + data[:2])[0]
    return struct.unpack(_SCALARS[info["dtype"]], data[:struct.calcsize(_SCALARS[info["dtype"]])])[0]


@dataclass(frozen=True)
class LoraFile:
    """What one LoRA file says about its scale."""

    metadata_scale: Optional[float]  # lora_alpha / r from lora_adapter_metadata (diffusers reads it)
    tensor_scale: Optional[float]  # alpha / rank from `.alpha` tensors (ComfyUI reads it)


def _metadata_scale(metadata: Dict[str, str]) -> Optional[float]:
    try:
        config = json.loads(metadata[METADATA_KEY])
        alpha = next(v for k, v in config.items() if k.split(".")[-1] == "lora_alpha")
        rank = next(v for k, v in config.items() if k.split(".")[-1] == "r")
        return float(alpha) / float(rank)
    except (KeyError, ValueError, TypeError, StopIteration, ZeroDivisionError):
        return None


def _rank_of(tensors: Dict[str, Any], module: str) -> Optional[int]:
    for suffix in (".lora_A.weight", ".lora_down.weight", ".lora.down.weight"):
        info = tensors.get(module + suffix)
        if info:
            return int(info["shape"][0])
    return None


def inspect(path: Path) -> LoraFile:
    """The scales a LoRA file carries; EvalError for an unreadable file."""
    size, metadata, tensors = read_header(path)
    scales = set()
    for key, info in tensors.items():
        if key.endswith(".alpha") and info.get("dtype") in (*_SCALARS, "BF16"):
            rank = _rank_of(tensors, key[: -len(".alpha")])
            if rank:
                scales.add(round(_scalar(path, size, info) / rank, 6))
    if len(scales) > 1:
        raise EvalError(f"{path}: its .alpha tensors give different scales {sorted(scales)} per module; "
                        "sd3exp renders one strength per checkpoint and cannot render this file faithfully")
    return LoraFile(_metadata_scale(metadata), scales.pop() if scales else None)


@dataclass(frozen=True)
class Strength:
    """The scale to render a LoRA checkpoint at, and what ComfyUI's loader must be given for it."""

    trained: float  # alpha / rank of training
    comfy_strength: float  # strength_model: trained / what the file's .alpha tensors apply already
    source: str  # where `trained` comes from


def strengths(checkpoints: Sequence[Checkpoint], rank: int, alpha: float) -> Tuple[Dict[str, Strength], List[str]]:
    """label -> Strength for the LoRA checkpoints, and warnings to print before anything is queued.

    The trained scale is the checkpoint's own metadata, else the metadata the run's other
    checkpoints agree on (SimpleTuner's final file has none), else `.alpha` tensors, else the
    experiment's lora.alpha / lora.rank."""
    configured, files, warnings = alpha / rank, {}, []
    for c in (c for c in checkpoints if c.kind == "lora"):
        try:
            files[c.label] = inspect(c.path)
        except EvalError as exc:  # the backend reports the load failure in its cells
            warnings.append(str(exc))
            files[c.label] = LoraFile(None, None)
    recorded = sorted({f.metadata_scale for f in files.values() if f.metadata_scale is not None})
    if len(recorded) == 1 and abs(recorded[0] - configured) > 1e-6:
        warnings.append(f"the LoRA checkpoints record alpha/rank = {recorded[0]:g} in their metadata, but "
                        f"lora.alpha/lora.rank = {alpha:g}/{rank} = {configured:g}: rendering at {recorded[0]:g}, "
                        "the scale they were trained with")
    run_scale = recorded[0] if len(recorded) == 1 else configured
    result = {}
    for label, f in files.items():
        if f.metadata_scale is not None:
            trained, source = f.metadata_scale, "its metadata"
        elif recorded and len(recorded) == 1:
            trained, source = run_scale, "the run's other checkpoints"
        elif f.tensor_scale is not None:
            trained, source = f.tensor_scale, "its .alpha tensors"
        else:
            trained, source = configured, "lora.alpha/lora.rank"
        result[label] = Strength(trained, trained / (f.tensor_scale or 1.0), source)
    return result, warnings
