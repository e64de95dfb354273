"""A small, deterministic captioned image set for CPU demos and tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .errors import ConfigError, RunConflictError
from .io import atomic_dir

MANIFEST = "sd3exp-demo.json"
FORMAT = 1
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (130, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def _check(trigger: str, counts: dict[tuple[int, int], int]) -> None:
    if not trigger.strip() or any(c in trigger for c in ",\n\r"):
        raise ConfigError("trigger", trigger, "must be one non-empty tag without commas or newlines", "use e.g. 'k4s4'")
    for (w, h), n in counts.items():
        if min(w, h) < 8 or n < 1:
            raise ConfigError("counts", {(w, h): n}, "sizes must be at least 8x8 and counts at least 1", "fix the entry")


def _draw(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str, str, str]:
    colour, background = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    w, h = size
    side = rng.randint(min(w, h) // 3, min(w, h) * 3 // 4)
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    img = Image.new("RGB", size, COLOURS[background])
    draw = ImageDraw.Draw(img)
    box = (x, y, x + side - 1, y + side - 1)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
    return img, colour, shape, background


def shape_pixels(count: int, size: int, seed: int) -> bytes:
    """count seeded square shape images like the dataset's, as raw RGB bytes (count x size x size x 3)."""
    rng = random.Random(seed)
    return b"".join(_draw(rng, (size, size))[0].tobytes() for _ in range(count))


def _write_images(folder: Path, trigger: str, counts: dict[tuple[int, int], int], seed: int) -> None:
    rng = random.Random(seed)
    index = 0
    for w, h in sorted(counts):
        for _ in range(counts[(w, h)]):
            img, colour, shape, background = _draw(rng, (w, h))
            stem = folder / f"{index:04d}_{w}x{h}"
            img.save(stem.with_suffix(".png"), format="PNG")
            caption = f"{trigger}, {colour} {shape}, {background} background, simple shapes"
            stem.with_suffix(".txt").write_text(caption, encoding="utf-8")
            index += 1


def _manifest(trigger: str, counts: dict[tuple[int, int], int], seed: int) -> dict[str, Any]:
    sizes = [[w, h, counts[(w, h)]] for w, h in sorted(counts)]
    return {"format": FORMAT, "trigger": trigger, "seed": seed, "sizes": sizes}


def _read_manifest(folder: Path) -> Any:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def outdated(folder: Path, counts: dict[tuple[int, int], int]) -> bool:
    """`folder` is a demo dataset (it has the manifest) of another recipe: other image counts or format.
    Its seed and trigger do not count (the jobs of a seed sweep share one dataset)."""
    found = _read_manifest(folder)
    if not (isinstance(found, dict) and {"trigger", "seed"} <= found.keys()):
        return False
    return found != _manifest(found["trigger"], counts, found["seed"])


def set_aside(folder: Path) -> Path:
    """Rename `folder` to the first free <name>.previous-N beside it (nothing is deleted)."""
    n = 1
    while folder.with_name(f"{folder.name}.previous-{n}").exists():
        n += 1
    return folder.rename(folder.with_name(f"{folder.name}.previous-{n}"))


def make_demo_dataset(folder: Path, trigger: str, counts: dict[tuple[int, int], int], seed: int) -> Path:
    """Write counts[(width, height)] PNGs with .txt captions to folder, atomically.

    Same arguments, same bytes. A folder made earlier with the same arguments
    is reused; any other non-empty folder is left alone (RunConflictError).
    The parameters are recorded in sd3exp-demo.json (not an image or caption).
    """
    _check(trigger, counts)
    folder = Path(folder)
    wanted = _manifest(trigger, counts, seed)
    if _read_manifest(folder) == wanted:
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunConflictError(
            f"{folder} already holds files that are not a demo dataset with these parameters; "
            "choose another folder or remove it"
        )
    with atomic_dir(folder) as tmp:  # an empty `folder` is replaced
        _write_images(tmp, trigger, counts, seed)
        (tmp / MANIFEST).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return folder
