"""Caption tags: the splitting rule, the keep-N shuffle, SimpleTuner's caption_shuffle block.

Splitting rule (used by the materialized shuffle and by the audit): a caption is
split on the concept's ``captions.separator`` (default ","; whitespace around the
setting is ignored, so ", " means ",", and " " means a space) and on line breaks;
each piece is stripped and empty pieces are dropped. A shuffled caption is joined
with the separator plus one space (", " by default, " " for a space separator):
SimpleTuner's own delimiters.

Not supported, on purpose:

- splitting on "." as well as "," (the source script's ``re.split('[,.]')``): it
  cuts "1.5" or "st. louis" apart; set ``separator: "."`` for sentence captions.
- kohya's ``keep_tokens_separator`` ("|||"): SimpleTuner's native shuffle has no
  such notion and both modes must mean the same thing; use ``keep_tags``. The
  audit flags captions that contain "|||".

Native mode hands the shuffle to SimpleTuner (``caption_shuffle``), which only
splits on ",", "." or " " and treats each line of a caption file as a caption of
its own. Materialized mode writes R shuffled copies (the source's way); every
copy's shuffle is seeded by (seed, concept id, file name, copy index), so the
same settings give the same captions on any machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Iterable, Optional

from sd3exp.errors import ConfigError
from sd3exp.schema import ConceptConfig

NATIVE_SPLIT_ON = {",": "comma", ".": "period", " ": "space"}


def _where(concept: ConceptConfig, where: Optional[str]) -> str:
    """How errors name the concept: `where` (e.g. "concepts[0]") or by its id."""
    return where or f"concepts[id={concept.id}]"


def tag_separator(concept: ConceptConfig, where: Optional[str] = None) -> str:
    """The concept's separator, normalised: ", " -> ",", "  " -> " "."""
    raw = concept.captions.separator
    sep = raw.strip() or (" " if raw and set(raw) == {" "} else "")
    if not sep:
        raise ConfigError(f"{_where(concept, where)}.captions.separator", raw,
                          "the tag separator is empty or only line breaks/tabs", 'use "," (or "." / " ")')
    return sep


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags: split on `separator` and line breaks, stripped, empty ones dropped."""
    pieces = re.split(f"{re.escape(separator)}|\n", caption) if separator != " " else caption.split()
    return [p.strip() for p in pieces if p.strip()]


def join_tags(tags: Iterable[str], separator: str = ",") -> str:
    return (separator if separator == " " else separator + " ").join(tags)


def shuffle_caption(caption: str, keep_tags: int, rng: random.Random, separator: str = ",") -> str:
    """The caption with its first `keep_tags` tags in place and the others shuffled."""
    return shuffle_tags(split_tags(caption, separator), keep_tags, rng, separator)


def shuffle_tags(tags: list[str], keep_tags: int, rng: random.Random, separator: str = ",") -> str:
    """shuffle_caption of a caption already split (`tags` is not changed)."""
    rest = tags[keep_tags:]
    rng.shuffle(rest)
    return join_tags(tags[:keep_tags] + rest, separator)


def copy_seed(seed: int, concept_id: str, file_name: str, copy_index: int) -> int:
    """A stable 64-bit seed for one copy's shuffle (sha256, never Python's salted hash())."""
    key = f"{seed}\0{concept_id}\0{file_name}\0{copy_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def shuffle_seed(concept: ConceptConfig, seed: int) -> int:
    """The concept's captions.seed, else the experiment's `seed`."""
    return seed if concept.captions.seed is None else concept.captions.seed


def materialized(concept: ConceptConfig) -> bool:
    """Whether the passes are written as shuffled copies (a shuffle-off concept is never copied)."""
    return concept.captions.shuffle and concept.captions.mode == "materialized"


def simpletuner_repeats(concept: ConceptConfig) -> int:
    """SimpleTuner's `repeats`: passes - 1, or 0 when the copies carry the passes."""
    return 0 if materialized(concept) else concept.repeats - 1


def native_shuffle_block(concept: ConceptConfig, seed: int, where: Optional[str] = None) -> dict | None:
    """multibackend.json `caption_shuffle` for native mode; None when shuffle is off or materialized.

    SimpleTuner builds `count` variants per caption at text-embed caching time
    (seeded by seed + md5(caption) + i, duplicates dropped) and draws one per
    sample. `include_original` is false: like kohya and the source, every pass
    sees a shuffled caption (SimpleTuner keeps the original anyway, with a
    warning, when a caption has at most one tag to shuffle).
    """
    cap = concept.captions
    if not cap.shuffle or materialized(concept):
        return None
    sep = tag_separator(concept, where)
    if sep not in NATIVE_SPLIT_ON:
        raise ConfigError(f"{_where(concept, where)}.captions.separator", cap.separator,
                          "SimpleTuner's native caption_shuffle only splits on ',', '.' or ' '",
                          "use one of those, or captions.mode=materialized")
    count = concept.repeats if cap.variants is None else cap.variants
    if count < 1:
        raise ConfigError(f"{_where(concept, where)}.captions.variants", cap.variants, "must be >= 1",
                          "leave it unset to use one variant per pass (repeats)")
    return {"enable": True, "count": count, "seed": shuffle_seed(concept, seed),
            "split_on": NATIVE_SPLIT_ON[sep], "position_start": cap.keep_tags, "include_original": False}


def estimate_clip_tokens(caption: str) -> int:
    """Words plus punctuation marks: a lower bound of CLIP's BPE token count.

    Common English words are one token and each punctuation mark is one; rare
    words, names and numbers split into several, so a caption over audit.CLIP_TOKENS
    by this count is almost surely truncated by SD3's CLIP encoders (T5 reads on).
    """
    return len(re.findall(r"\w+|[^\w\s]", caption))
