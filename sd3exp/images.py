"""Listing a dataset folder's images and reading their sizes from file headers."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: Path) -> List[Path]:
    """Image files directly in `folder` (not hidden), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header, without decoding pixels; EXIF rotation applied."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_sizes(folder: Path) -> List[Tuple[int, int]]:
    return [image_size(p) for p in list_images(folder)]
