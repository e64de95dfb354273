"""Which images of a concept are held out of training for SimpleTuner's validation loss.

The choice is seeded by the experiment's seed and the concept id, and made from the sorted
image names, so the same folder and seed always hold out the same images (recorded in
plan.json and the prepare manifest). Held-out images go to `<prepared_dir>/<id>.holdout/`,
which the compiler declares as a `dataset_type: eval` backend; they are never trained on.
"""

from __future__ import annotations

import random
from typing import List, Sequence

from sd3exp.errors import ConfigError
from sd3exp.schema import ConceptConfig

SUFFIX = ".holdout"  # a concept id has no dot, so `<id>.holdout` is never another concept's folder


def folder_name(concept_id: str) -> str:
    """The held-out images' prepared folder, also their eval dataset's id (loss/val/<id>.holdout)."""
    return concept_id + SUFFIX


def check_count(c: ConceptConfig, i: int, images: int) -> None:
    """ConfigError when holding out `c.holdout` of `images` leaves nothing to train on."""
    if c.holdout and c.holdout >= images:
        raise ConfigError(f"concepts[{i}].holdout", c.holdout,
                          f"holds out {c.holdout} of the {images} images of concept '{c.id}', leaving "
                          f"{max(images - c.holdout, 0)} to train on",
                          f"set concepts[{i}].holdout to at most {images - 1}, or 0 for no held-out loss")


def held_out(c: ConceptConfig, names: Sequence[str], seed: int) -> List[str]:
    """The names (sorted) of the `c.holdout` images held out of `names`."""
    if not c.holdout:
        return []
    rng = random.Random(f"sd3exp-holdout:{seed}:{c.id}")
    return sorted(rng.sample(sorted(names), min(c.holdout, len(names))))
