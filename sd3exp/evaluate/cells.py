"""The backend-neutral render types: what to render (`CellSpec`, `Sampling`, `RenderJob`), what came
back (`Cell`), how a stopped sweep hands over its cells (`SweepInterrupted`), and cells.json.

Every render backend (sd3exp.evaluate.comfyui, sd3exp.evaluate.diffusers_backend) offers
`render(cfg, job, run_dir, images) -> list[Cell]`. A cell is never dropped: a failed render is a
cell with status "error" and its error text, so grids and reports show it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Literal, Mapping, Optional, Sequence, Tuple, Union

from sd3exp.evaluate.checkpoints import BASE_LABEL, Checkpoint
from sd3exp.evaluate.lora_scale import Strength
from sd3exp.io import read_json, write_json

if TYPE_CHECKING:
    from sd3exp.schema import EvalConfig

__all__ = ["BASE_LABEL", "Cell", "CellKey", "CellSpec", "IMAGE_NAME", "RenderJob", "Resolver", "Sampling",
           "SweepInterrupted", "Variant", "cell_image", "cell_key", "column_title", "image_name", "plan_cells",
           "read_cells_json", "write_cells_json"]

CellKey = Tuple[str, int, int, str]  # label, prompt index, seed, variant (sd3exp/evaluate/axes.py slug)


@dataclass(frozen=True)
class Sampling:
    """Values set on every cell; None keeps the workflow's own. Steps and CFG are axes
    (sd3exp/evaluate/axes.py): `of` leaves them to each cell's variant."""

    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sampler: Optional[str] = None  # KSampler sampler_name
    scheduler: Optional[str] = None  # KSampler scheduler
    shift: Optional[float] = None  # ModelSamplingSD3 shift

    @classmethod
    def of(cls, ev: "EvalConfig") -> "Sampling":
        """The eval config's fixed sampling values (an empty negative prompt keeps the workflow's)."""
        return cls(ev.negative_prompt or None, None, None, ev.width, ev.height)


@dataclass(frozen=True)
class Variant:
    """One combination of the axis values a checkpoint is rendered at; `name` its image-name part."""

    name: str
    axes: Tuple[Tuple[str, Any], ...]  # (axis, value) in sd3exp.evaluate.axes.AXES order

    def value(self, axis: str) -> Any:
        return dict(self.axes).get(axis)

    def sampling(self, fixed: Sampling) -> Sampling:
        """`fixed` with this variant's steps, CFG, sampler, scheduler and shift (None keeps fixed's)."""
        values = {k: v for k, v in self.axes if k in ("steps", "cfg", "sampler", "scheduler", "shift")
                  and v is not None}
        return replace(fixed, **values)


PLAIN = Variant("", ())  # no axis values: the workflow's (pipeline's) own


@dataclass(frozen=True)
class CellSpec:
    """One render: a checkpoint, a prompt, a seed, at one variant of the axes."""

    checkpoint: Checkpoint
    prompt_index: int
    prompt: str
    seed: int
    variant: Variant = PLAIN


def plan_cells(checkpoints: Sequence[Checkpoint], prompts: Sequence[str], seeds: Sequence[int],
               variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> list[CellSpec]:
    """All cells, checkpoint-major, then variant, then prompt, then seed; `variants` per checkpoint label
    (one plain variant when not given)."""
    variants = variants or {}
    return [CellSpec(c, i, p, s, v) for c in checkpoints for v in variants.get(c.label, [PLAIN])
            for i, p in enumerate(prompts) for s in seeds]


@dataclass
class Cell:
    """The result of one render."""

    label: str
    step: Optional[int]
    prompt_index: int
    prompt: str
    seed: int
    status: Literal["ok", "error"] = "error"
    images: list[bytes] = field(default_factory=list)  # when not saved to disk
    paths: list[Path] = field(default_factory=list)  # when saved to save_dir
    files: list[str] = field(default_factory=list)  # server-side names, subfolder/filename
    error: str = ""
    seconds: float = 0.0
    prompt_id: Optional[str] = None
    lora_scale: Optional[float] = None  # a LoRA checkpoint's alpha/rank it was rendered at
    scores: dict[str, float] = field(default_factory=dict)  # measure -> value (sd3exp/evaluate/score.py)
    memorised: Optional[bool] = None  # a near-copy of one training image; None: not scored
    scored_with: str = ""  # digest of what the scores depend on besides the image; "" = not scored
    variant: str = ""  # the image-name part of its axis values ("" for the only combination)
    axes: Dict[str, Any] = field(default_factory=dict)  # axis -> value rendered at (sd3exp/evaluate/axes.py)


def cell_key(cell: Cell) -> CellKey:
    """(label, prompt index, seed, variant): a cell's place in one evaluation."""
    return cell.label, cell.prompt_index, cell.seed, cell.variant


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep: the cells finished so far, our queued prompts cancelled."""

    def __init__(self, cells: Sequence["Cell"], signum: int) -> None:
        super().__init__(f"{len(cells)} cell(s) finished")
        self.cells, self.signum = list(cells), signum

    @classmethod
    def during(cls, exc: KeyboardInterrupt, cells: Sequence["Cell"]) -> "SweepInterrupted":
        return cls(cells, getattr(exc, "signum", signal.SIGINT))


@dataclass(frozen=True)
class RenderJob:
    """The cells still to render: these checkpoints (and the base model) x variants x prompts x seeds, less
    `skip`."""

    checkpoints: list[Checkpoint]
    include_base: bool
    skip: FrozenSet[CellKey]
    strengths: Mapping[str, Strength] = field(default_factory=dict)  # LoRA label -> scale to render at
    changed: FrozenSet[str] = frozenset()  # labels whose file changed since the last evaluation
    variants: Mapping[str, Sequence[Variant]] = field(default_factory=dict)  # label -> its variants


IMAGE_NAME = "{label}{variant}_p{prompt_index}_s{seed}{suffix}.png"  # also handed to the diffusers worker


def column_title(label: str, step: Optional[int]) -> str:
    """Grid header for a checkpoint: "step N", "final" or "base model"."""
    if step is not None:
        return f"step {step}"
    return "base model" if label == BASE_LABEL else label


def image_name(label: str, prompt_index: int, seed: int, n: int = 0, variant: str = "") -> str:
    """`<label><variant>_p<i>_s<seed>.png` (`-<n>` before `.png` for a cell's further images)."""
    return IMAGE_NAME.format(label=label, variant=variant, prompt_index=prompt_index, seed=seed,
                             suffix=f"-{n}" if n else "")


def cell_image(cell: Cell) -> Union[Path, bytes, None]:
    """The cell's (first) image: a file path, PNG bytes, or None."""
    if cell.paths:
        return Path(cell.paths[0])
    return cell.images[0] if cell.images else None


class Resolver:
    """Path.resolve() for many files in a few folders: each folder resolved once (its symlinks followed
    once, not once per file), a file that is itself a symlink in full; the same paths as Path.resolve()."""

    def __init__(self) -> None:
        self.folders: Dict[Path, Path] = {}

    def __call__(self, path: Path | str) -> Path:
        path = Path(path)
        if path.name in ("", ".", "..") or path.is_symlink():
            return path.resolve()
        folder = self.folders.get(path.parent)
        if folder is None:
            folder = self.folders[path.parent] = path.parent.resolve()
        return folder / path.name


def _relative(path: Path, base: Path, resolve: Callable[[Path], Path] = Path.resolve) -> str:
    try:
        return resolve(path).relative_to(resolve(base)).as_posix()
    except ValueError:
        return str(resolve(path))


def cell_record(cell: Cell, base: Path, resolve: Callable[[Path], Path] = Path.resolve) -> dict:
    """A cell as JSON data: image bytes left out, paths relative to `base` when inside it."""
    record = {f.name: getattr(cell, f.name) for f in fields(cell) if f.name != "images"}
    record["paths"] = [_relative(Path(p), base, resolve) for p in cell.paths]
    record["seconds"] = round(cell.seconds, 3)
    return record


def write_cells_json(cells: Sequence[Cell], path: Path | str) -> None:
    """Write `cells.json` atomically: one record per cell, image paths relative to its folder."""
    path, resolve = Path(path), Resolver()
    write_json(path, [cell_record(c, path.parent, resolve) for c in cells])


def read_cells_json(path: Path | str) -> list[Cell]:
    """Cells back from `cells.json`; relative image paths are resolved against its folder."""
    path = Path(path)
    return [Cell(**{**rec, "paths": [path.parent / p for p in rec["paths"]]}) for rec in read_json(path)]
