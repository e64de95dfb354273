"""Reusing an earlier evaluation: only cells whose inputs changed are rendered again.

A cell is reused when the earlier evaluation of this run had the same render
settings (backend, sampling, workflow file bytes and inputs, base model), its
checkpoint file is unchanged (path and mtime; a LoRA's scale too), its prompt text, seed and axis
values (strength, CFG, steps, ...) are still asked for, it succeeded, and its images are still on
disk. Its images are linked (or copied) into the new eval/images under the new prompt index and
variant name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sd3exp.evaluate.axes import combo_of
from sd3exp.evaluate.cells import BASE_LABEL, PLAIN, Cell, CellKey, Variant, image_name, read_cells_json
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.io import read_json
from sd3exp.layout import EvalLayout


def fingerprints(checkpoints: Sequence[Checkpoint], include_base: bool,
                 scales: Optional[Mapping[str, float]] = None) -> Dict[str, List]:
    """label -> [weights path, mtime_ns] (+ the LoRA scale rendered at); the base model is covered by
    the render settings."""
    scales = scales or {}
    found = {c.label: [str(c.path), c.path.stat().st_mtime_ns] + ([scales[c.label]] if c.label in scales else [])
             for c in checkpoints}
    return {BASE_LABEL: [], **found} if include_base else found


def wanted(labels: Sequence[str], prompts: Sequence[str], seeds: Sequence[int],
           variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> List[CellKey]:
    """Every cell of the grid, checkpoint-major, then variant (one plain variant when not given)."""
    variants = variants or {}
    return [(label, i, seed, v.name) for label in labels for v in variants.get(label, [PLAIN])
            for i in range(len(prompts)) for seed in seeds]


def reusable(previous: Sequence[Cell], before: Mapping[str, Any], now: Mapping[str, Any],
             prompts: Sequence[str], seeds: Sequence[int],
             variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> Dict[CellKey, Cell]:
    """Cells of the previous evaluation (request record `before`) still valid under `now`, by their new key."""
    if before.get("settings") != now["settings"]:
        return {}
    old, new, variants = before.get("checkpoints", {}), now["checkpoints"], variants or {}
    by_content = {(c.label, c.prompt, c.seed, combo_of(c.axes)): c for c in previous
                  if c.status == "ok" and c.paths and all(Path(p).is_file() for p in c.paths)
                  and c.label in new and old.get(c.label) == new[c.label]}
    found = {}
    for label in new:
        for v in variants.get(label, [PLAIN]):
            for index in range(len(prompts)):
                for seed in seeds:
                    cell = by_content.get((label, prompts[index], seed, combo_of(dict(v.axes))))
                    if cell is not None:
                        found[(label, index, seed, v.name)] = replace(cell, prompt_index=index, variant=v.name)
    return found


def load_previous(eval_dir: Optional[Path]) -> Tuple[List[Cell], Dict[str, Any]]:
    """An earlier evaluation's cells and request record; empty when there is none to reuse."""
    folder = EvalLayout(eval_dir) if eval_dir is not None else None
    if folder is None or not folder.cells.is_file() or not folder.request.is_file():
        return [], {}
    return read_cells_json(folder.cells), read_json(folder.request)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def adopt(cells: Mapping[CellKey, Cell], images_dir: Path) -> Dict[CellKey, Cell]:
    """The reused cells with their images placed in `images_dir` under their (new) names."""
    images_dir.mkdir(parents=True, exist_ok=True)
    placed = {}
    for key, cell in cells.items():
        paths = [images_dir / image_name(cell.label, cell.prompt_index, cell.seed, n, cell.variant)
                 for n in range(len(cell.paths))]
        for source, target in zip(cell.paths, paths):
            _link_or_copy(Path(source), target)
        placed[key] = replace(cell, paths=paths)
    return placed
