"""Helpers around `Cell`, the one result type every render backend returns.

`Cell` itself is defined with the ComfyUI client (sd3exp.evaluate.comfyui) and
re-exported here. A cell is never dropped: a failed render is a cell with
status "error" and its error text, so grids and reports show it.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from sd3exp.evaluate.checkpoints import BASE_LABEL
from sd3exp.evaluate.comfyui import Cell
from sd3exp.io import read_json, write_bytes, write_json

__all__ = ["BASE_LABEL", "Cell", "IMAGE_NAME", "cell_image", "column_title", "image_name", "read_cells_json",
           "store_images", "write_cells_json"]

IMAGE_NAME = "{label}_p{prompt_index}_s{seed}{suffix}.png"  # also handed to the diffusers worker


def column_title(label: str, step: Optional[int]) -> str:
    """Grid header for a checkpoint: "step N", "final" or "base model"."""
    if step is not None:
        return f"step {step}"
    return "base model" if label == BASE_LABEL else label


def image_name(label: str, prompt_index: int, seed: int, n: int = 0) -> str:
    """`<label>_p<i>_s<seed>.png` (`-<n>` before `.png` for a cell's further images)."""
    return IMAGE_NAME.format(label=label, prompt_index=prompt_index, seed=seed, suffix=f"-{n}" if n else "")


def cell_image(cell: Cell) -> Union[Path, bytes, None]:
    """The cell's (first) image: a file path, PNG bytes, or None."""
    if cell.paths:
        return Path(cell.paths[0])
    return cell.images[0] if cell.images else None


def store_images(cells: Sequence[Cell], folder: Path | str) -> list[Cell]:
    """Copies of the cells whose in-memory images are written (atomically) to `folder/image_name(...)`."""
    stored = []
    for cell in cells:
        names = [image_name(cell.label, cell.prompt_index, cell.seed, n) for n in range(len(cell.images))]
        paths = [Path(folder) / name for name in names]
        for path, data in zip(paths, cell.images):
            write_bytes(path, data)
        stored.append(replace(cell, images=[], paths=list(cell.paths) + paths) if paths else cell)
    return stored


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def cell_record(cell: Cell, base: Path) -> dict:
    """A cell as JSON data: image bytes left out, paths relative to `base` when inside it."""
    record = {f.name: getattr(cell, f.name) for f in fields(cell) if f.name != "images"}
    record["paths"] = [_relative(p, base) for p in cell.paths]
    record["seconds"] = round(cell.seconds, 3)
    return record


def write_cells_json(cells: Sequence[Cell], path: Path | str) -> None:
    """Write `cells.json` atomically: one record per cell, image paths relative to its folder."""
    path = Path(path)
    write_json(path, [cell_record(c, path.parent) for c in cells])


def read_cells_json(path: Path | str) -> list[Cell]:
    """Cells back from `cells.json`; relative image paths are resolved against its folder."""
    path = Path(path)
    return [Cell(**{**rec, "paths": [path.parent / p for p in rec["paths"]]}) for rec in read_json(path)]
