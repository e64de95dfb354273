"""SimpleTuner 4.10.1's aspect-bucket assignment, ported as a pure function.

Mirrors simpletuner/helpers/image_manipulation/training_sample.py
(calculate_target_size) and helpers/multiaspect/image.py for SD3, whose bucket
sides are aligned to 64 px. Python's round() (banker's rounding) is used on
purpose: SimpleTuner uses it too, which is why 96x64 and 64x96 are not
symmetric at resolution 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import floor, sqrt
from typing import Optional, Tuple

ALIGNMENT = 64


@dataclass(frozen=True)
class BucketRule:
    resolution: float
    resolution_type: str = "pixel_area"
    crop: bool = False
    crop_aspect: str = "square"
    minimum_image_size: Optional[float] = None


def _round_multiple(value: float, multiple: int = ALIGNMENT) -> int:
    return max(round(value / multiple) * multiple, multiple)


def aspect(size: Tuple[int, int]) -> float:
    return round(size[0] / size[1], 2)


def _by_pixel_edge(ar: float, resolution: int, size: Tuple[int, int]) -> Tuple[int, int]:
    if size[0] < size[1]:
        w, h = resolution, int(resolution / ar)
    else:
        w, h = int(resolution * ar), resolution
    return _round_multiple(w), _round_multiple(h)


def _by_pixel_area(ar: float, megapixels: float, size: Tuple[int, int]) -> Tuple[int, int]:
    edge = _round_multiple(int(sqrt(megapixels * 1e6)))
    if ar == 1.0 and size[0] == size[1]:
        return edge, edge
    return _round_multiple(edge * sqrt(ar)), _round_multiple(edge / sqrt(ar))


def target_size(size: Tuple[int, int], rule: BucketRule) -> Tuple[int, int]:
    """The (width, height) SimpleTuner trains this image at."""
    ar = aspect(size)
    if rule.resolution_type == "pixel":
        return _by_pixel_edge(ar, int(rule.resolution), size)
    if rule.resolution_type == "pixel_area":
        return _by_pixel_area(ar, rule.resolution**2 / 1e6, size)
    if rule.resolution_type == "area":
        return _by_pixel_area(ar, rule.resolution, size)
    raise ValueError(f"unknown resolution_type {rule.resolution_type!r}")


MAX_MINIMUM_MEGAPIXELS = 5  # SimpleTuner refuses a larger area minimum


def minimum_megapixels(rule: BucketRule) -> float:
    """A set minimum_image_size as SimpleTuner compares it for the area rules (pixel_area is converted)."""
    m = rule.minimum_image_size
    if m is None:
        raise ValueError("minimum_megapixels: the rule has no minimum_image_size")
    return (m * m) / 1_000_000 if rule.resolution_type == "pixel_area" else m


def too_small(size: Tuple[int, int], rule: BucketRule) -> bool:
    """Whether SimpleTuner would skip the image for minimum_image_size (metadata backend's
    meets_resolution_requirements): pixel compares both edges, pixel_area and area the pixel
    count, plus the edge of a square crop."""
    if not rule.minimum_image_size:
        return False
    width, height = size
    if rule.resolution_type == "pixel":
        return min(width, height) < rule.minimum_image_size
    pixels = minimum_megapixels(rule) * 1_000_000
    if rule.crop and rule.crop_aspect == "square" and min(width, height) < floor(sqrt(pixels)):
        return True
    return width * height < pixels


def bucket_of(size: Tuple[int, int], rule: BucketRule) -> Optional[float]:
    """The aspect bucket key of an image of `size` (width, height), None if skipped."""
    if too_small(size, rule):
        return None
    if rule.crop and rule.crop_aspect == "square":
        return 1.0
    return aspect(target_size(size, rule))


@dataclass(frozen=True)
class BucketTrainer:
    """What decides a bucket's fate in SimpleTuner 4.10.1 besides its size (helpers/metadata/backends/base.py)."""

    batch_size: int
    processes: int = 1
    gradient_accumulation: int = 1
    pruning: bool = False  # minimum_image_size is set: _enforce_min_bucket_size prunes below one batch
    oversubscription: bool = False  # --allow_dataset_oversubscription

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.processes * self.gradient_accumulation


def bucket_fate(images: int, repeats: int, trainer: BucketTrainer) -> Tuple[str, int]:
    """("kept" | "padded" | "pruned" | "aborts", the main process's samples per epoch) for a bucket of
    `images` files with SimpleTuner `repeats` (passes - 1). Pruned silently only with minimum_image_size
    (images x (repeats+1) < batch); then split_buckets_between_processes aborts ("zero usable batches") on
    any bucket below one effective batch, unless oversubscription is on and repeats is 0, which pads it."""
    samples = images * (repeats + 1)
    if trainer.pruning and samples < trainer.batch_size:
        return "pruned", 0
    eff = trainer.effective_batch
    if samples >= eff:
        return "kept", -(-images // trainer.processes) * (repeats + 1)
    if not (trainer.oversubscription and repeats == 0):
        return "aborts", 0
    logical = images * -(-eff // images)
    return "padded", -(-logical // eff) * eff // trainer.processes


def repeats_needed(images: int, trainer: BucketTrainer) -> int:
    """The fewest passes (kohya's repeats) that give a bucket of `images` one effective batch."""
    return -(-trainer.effective_batch // images)
