"""One SimpleTuner text-embed and VAE cache per dataset, shared by the runs that train on it.

What SimpleTuner caches depends on the prepared images and captions (file names, image bytes,
caption text, native caption-shuffle variants), the resolution and crop settings, the model whose
VAE and text encoders encode them, the precision and the trainer version. The cache key is a
sha256 of exactly those, and the caches live in `<dataset.cache_dir>/<key>/` (`vae/<concept id>/`,
`text/`): runs of a sweep on the same data share one cache, different data never does. A changed
dataset gets a new key, so no stale latent is ever read (nothing has to be cleared).

SimpleTuner does not lock its caches: `filling` holds the key folder's lock from the trainer's
start until its step bar appears (the caches are complete by then), so jobs that start at once take
turns and the later ones find every latent and embed already computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional

from sd3exp import tag_shuffle
from sd3exp.errors import DatasetError
from sd3exp.runfolder import waiting_lock
from sd3exp.schema import ConceptConfig, ExperimentConfig

FORMAT = 1


def concept_digest(c: ConceptConfig, seed: int) -> Optional[str]:
    """sha256 of what the concept's prepared folders hold (names, image bytes, captions; held-out
    images under holdout/); None while its source folder is missing or unreadable (prepare reports why).
    Kept by the inputs' digest (prepare.inputs_digest): an unchanged dataset is not laid out again."""
    from sd3exp import prepare
    from sd3exp.sourcefacts import SourceFacts

    inputs, facts = prepare.inputs_digest(c, seed), SourceFacts(Path(c.path))
    if inputs in facts.digests:
        return facts.digests[inputs]
    try:
        lay = prepare.layout(c, seed)
    except DatasetError:
        return None
    files = {**lay.files, **{f"holdout/{name}": want for name, want in lay.held_out.items()}}
    h = hashlib.sha256()
    for name, want in sorted(files.items()):
        digest = hashlib.sha256(want).hexdigest() if isinstance(want, bytes) else facts.sha256(want)
        h.update(f"{name}\0{digest}\n".encode("utf-8"))
    if inputs is not None:
        facts.keep_digest(inputs, h.hexdigest())
    facts.save()
    return h.hexdigest()


def model_identity(cfg: ExperimentConfig) -> str:
    """The model by its path: relative to the project root when inside it (the same in every clone)."""
    root = Path(cfg.paths.root_dir).resolve()
    path = Path(cfg.model.path)
    if path.is_absolute() and path.resolve().is_relative_to(root):
        return path.resolve().relative_to(root).as_posix()
    return cfg.model.path


def key_data(cfg: ExperimentConfig) -> dict:
    """Everything the caches' content depends on."""
    from sd3exp.compile import whole

    ds, m = cfg.dataset, cfg.model
    return {
        "format": FORMAT, "trainer": cfg.trainer.version,
        "model": {"family": m.family, "path": model_identity(cfg), "flavour": m.flavour},
        "mixed_precision": cfg.training.mixed_precision,
        "images": {"resolution": whole(ds.resolution), "resolution_type": ds.resolution_type,
                   "minimum_image_size": whole(ds.minimum_image_size) if ds.minimum_image_size is not None else None,
                   "crop": ds.crop, "crop_style": ds.crop_style, "crop_aspect": ds.crop_aspect},
        "caption_dropout": ds.caption_dropout,
        "concepts": [{"id": c.id, "caption_strategy": c.caption_strategy,
                      "caption_shuffle": tag_shuffle.native_shuffle_block(c, cfg.seed),
                      "files": concept_digest(c, cfg.seed)} for c in cfg.concepts],
    }


def cache_key(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(key_data(cfg), sort_keys=True).encode("utf-8")).hexdigest()[:16]


def cache_dir(cfg: ExperimentConfig) -> Path:
    """The run's cache folder: `<dataset.cache_dir>/<key>`."""
    return Path(cfg.dataset.cache_dir).resolve() / cache_key(cfg)


@contextlib.contextmanager
def filling(folder: Path) -> Iterator[Callable[[], None]]:
    """Hold the cache folder's lock (waiting for a job filling it); yields `release`, called
    when the trainer's first step shows the caches complete (or at the latest on exit)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(waiting_lock(folder, "is filling the shared cache"))
        yield stack.close
