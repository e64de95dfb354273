"""Find the checkpoints a SimpleTuner run wrote, in step order.

Layouts (relative to the run's output folder):
- full fine-tune: `checkpoint-N/transformer/diffusion_pytorch_model.safetensors`,
  final model `pipeline/transformer/diffusion_pytorch_model.safetensors`;
- LoRA: `checkpoint-N/pytorch_lora_weights.safetensors`, final model
  `pytorch_lora_weights.safetensors`.
Incomplete checkpoints are returned as problems, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from sd3exp.errors import EvalError

Kind = Literal["full", "lora", "base"]  # base: the workflow's own model, untrained
BASE_LABEL = "base"
FULL_FILE = Path("transformer/diffusion_pytorch_model.safetensors")
LORA_FILE = Path("pytorch_lora_weights.safetensors")
FINAL_LABEL = "final"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)(-tmp)?")


@dataclass(frozen=True)
class Checkpoint:
    """One loadable model file; step None is the final model."""

    step: Optional[int]
    label: str
    kind: Kind
    path: Path


@dataclass
class Discovery:
    """Checkpoints to evaluate (sorted by step, final last) and what was wrong."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def select_steps(
    steps: Sequence[int], every_k: int = 1, min_step: Optional[int] = None, max_step: Optional[int] = None
) -> list[int]:
    """Steps in [min_step, max_step], sorted, then every k-th counting from the first kept."""
    if every_k < 1:
        raise EvalError(f"eval.every_k={every_k!r}: must be 1 or more")
    lo = min_step if min_step is not None else -1
    hi = max_step if max_step is not None else float("inf")
    in_range = sorted(s for s in steps if lo <= s <= hi)
    return in_range[::every_k]


def weights_of(folder: Path) -> tuple[Optional[Kind], Optional[Path], Optional[str]]:
    """(kind, weights file, None) for a complete model folder, else (None, None, problem)."""
    if (folder / FULL_FILE).is_file():
        return "full", folder / FULL_FILE, None
    if (folder / LORA_FILE).is_file():
        return "lora", folder / LORA_FILE, None
    if any((folder / FULL_FILE.parent).glob("diffusion_pytorch_model-*-of-*.safetensors")):
        return None, None, f"{folder}: sharded transformer weights; ComfyUI loads one file only, merge the shards first"
    problem = f"{folder}: no {FULL_FILE} (full fine-tune) or {LORA_FILE} (LoRA); incomplete or deleted checkpoint"
    return None, None, problem


def _scan_steps(out_dir: Path, problems: list[str]) -> dict[int, Path]:
    """checkpoint-N folders by N; `-tmp` folders (unfinished saves) become problems."""
    found: dict[int, Path] = {}
    for child in out_dir.iterdir():
        match = _CHECKPOINT.fullmatch(child.name)
        if not match or not child.is_dir():
            continue
        if match.group(2):
            problems.append(f"{child}: unfinished save (SimpleTuner renames checkpoint-N-tmp when done); skipped")
        else:
            found[int(match.group(1))] = child
    return found


def _final(out_dir: Path) -> tuple[Optional[Checkpoint], Optional[str]]:
    """The final model, or the problem of not finding one."""
    if (out_dir / "pipeline" / FULL_FILE).is_file():
        return Checkpoint(None, FINAL_LABEL, "full", out_dir / "pipeline" / FULL_FILE), None
    if (out_dir / LORA_FILE).is_file():
        return Checkpoint(None, FINAL_LABEL, "lora", out_dir / LORA_FILE), None
    return None, (
        f"{out_dir}: no final model (pipeline/{FULL_FILE} or {LORA_FILE}); training not finished?"
    )


def discover(
    out_dir: Path | str,
    every_k: int = 1,
    min_step: Optional[int] = None,
    max_step: Optional[int] = None,
    include_final: bool = True,
) -> Discovery:
    """Checkpoints of a SimpleTuner output folder, filtered by step, plus the final model."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise EvalError(f"training output folder {out_dir} does not exist; train first or fix paths.training_dir")
    result = Discovery()
    folders = _scan_steps(out_dir, result.problems)
    for step in select_steps(list(folders), every_k, min_step, max_step):
        kind, path, problem = weights_of(folders[step])
        if kind is not None and path is not None:
            result.checkpoints.append(Checkpoint(step, f"checkpoint-{step}", kind, path))
        elif problem:
            result.problems.append(problem)
    if include_final:
        final, problem = _final(out_dir)
        result.checkpoints.extend([final] if final else [])
        result.problems.extend([problem] if problem else [])
    return result
