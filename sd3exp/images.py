"""Listing a dataset folder's images and reading their sizes from file headers."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Collection, Dict, List, Optional, Tuple

from sd3exp.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FIX = "re-export the image, or move it out of the folder"


def list_images(folder: Path) -> List[Path]:
    """Image files directly in `folder` (not hidden), sorted by name."""
    with os.scandir(folder) as found:  # the entries' types come with the listing: no stat per file
        names = sorted(e.name for e in found
                       if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and not e.name.startswith(".")
                       and e.is_file())
    return [folder / name for name in names]


def problem(path: Path, err: Optional[BaseException]) -> str:
    """What is wrong with an image file, in words."""
    from PIL import Image  # Pillow only where an image is read

    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image Pillow can read (unknown or damaged header)"
    return f"{type(err).__name__}: {err}"


def image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header, without decoding pixels; EXIF rotation applied.
    A file whose header cannot be read raises DatasetError naming it."""
    from PIL import Image

    bad_image = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # UnidentifiedImageError: an OSError
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except bad_image:  # e.g. a PNG cut short: EXIF may sit after the pixels; the audit reports it
                orientation = 1
    except bad_image as err:
        raise DatasetError(f"{path}: {problem(path, err)}. Fix: {FIX}") from err
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def readable_sizes(folder: Path, skip: Collection[str] = ()) -> Tuple[List[Tuple[int, int]], Dict[str, str]]:
    """The sizes of the images whose header reads, and the others' problems by file name
    (images named in `skip` left out). Sizes are kept in sd3exp.sourcefacts: an unchanged image is not opened."""
    from sd3exp.sourcefacts import SourceFacts

    sizes, unreadable, facts = [], {}, SourceFacts(folder)
    for p in list_images(folder):
        if p.name in skip:
            continue
        try:
            sizes.append(tuple(facts.fact(p, "header", functools.partial(image_size, p))))
        except DatasetError as err:
            unreadable[p.name] = problem(p, err.__cause__)
    facts.save()
    return sizes, unreadable
