"""Which caption each image trains on: the user's `<stem>.txt` or the generated one.

captioner.prefer=user (default): the user's caption file when there is one, else
the caption store's. prefer=model: the store's whenever it has one. The generated
caption is post-processed again from its raw answer with the current settings, so
a changed trigger or separator never trains on a stale caption. Reads only; when a
concept has no store folder nothing is hashed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Dict

from sd3exp import tag_shuffle
from sd3exp.caption.store import Store, file_sha256
from sd3exp.images import list_images
from sd3exp.schema import CaptionerConfig, ConceptConfig


def post_settings(concept: ConceptConfig, c: CaptionerConfig):
    from sd3exp.caption.post import PostSettings

    return PostSettings(concept.trigger, tag_shuffle.tag_separator(concept), c.add_trigger, c.max_length)


def current_caption(record, concept: ConceptConfig, c: CaptionerConfig) -> str:
    """A stored record's caption under the current post-processing settings."""
    from sd3exp.caption.post import postprocess

    settings = post_settings(concept, c)
    return record.caption if record.post == asdict(settings) else postprocess(record.raw, settings)


def generated_captions(concept: ConceptConfig, c: CaptionerConfig) -> Dict[str, str]:
    """{image name: generated caption} for the images that train on a generated caption."""
    store = Store(Path(c.out_dir), concept.id)
    folder = Path(concept.path)
    if not store.dir.is_dir() or not folder.is_dir():
        return {}
    out = {}
    for image in list_images(folder):
        if c.prefer != "model" and image.with_suffix(".txt").is_file():
            continue
        record = store.get(file_sha256(image))
        if record is not None:
            out[image.name] = current_caption(record, concept, c)
    return out
