"""From a captioner's raw answer to a training caption (pure functions).

1. quotes around the whole answer and boilerplate openings ("This image shows", "In
   this picture,", "Sure! Here is a caption:") are stripped, case-insensitively;
2. the text is split into tags on the concept's separator and line breaks and joined
   again with it (sd3exp.tag_shuffle: one line, SimpleTuner's delimiters);
3. the trigger word is put first unless the caption already starts with it (the
   audit's rule: the trigger as a whole word at the start);
4. with `max_length`, whole tags are dropped from the end while the audit's CLIP
   token estimate exceeds it (the first tag, which holds the trigger, always stays; the
   last tag that is left is cut by words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from sd3exp.tag_shuffle import estimate_clip_tokens, join_tags, split_tags

_SUBJECT = r"(?:this|the|in\s+this|in\s+the)\s+(?:image|picture|photo(?:graph)?|illustration|artwork|drawing|painting|scene)"
BOILERPLATE = [
    re.compile(r"^(?:sure|certainly|of\s+course)\b[!.,]?\s*", re.I),
    re.compile(r"^here\s+(?:is|are)\s+(?:a|an|the)?\s*[\w\s-]{0,40}?(?:caption|description|tags?|list)\b[^:\n]*:\s*", re.I),
    re.compile(rf"^{_SUBJECT}\s+(?:shows|depicts|features|displays|presents|portrays|captures|contains|is\s+of)\s+", re.I),
    re.compile(rf"^{_SUBJECT}\s+is\s+(?=an?\s)", re.I),
    re.compile(rf"^{_SUBJECT}\s*,\s*(?:we\s+(?:see|can\s+see)\s+|there\s+(?:is|are)\s+)?", re.I),
    re.compile(r"^(?:caption|description|tags)\s*:\s*", re.I),
]


@dataclass(frozen=True)
class PostSettings:
    """What post-processing depends on (recorded with every stored caption)."""

    trigger: str
    separator: str  # normalised (sd3exp.tag_shuffle.tag_separator)
    add_trigger: bool = True
    max_length: Optional[int] = None


def strip_boilerplate(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':  # the whole answer in quotes
        text = text[1:-1].strip()
    changed = True
    while changed:
        changed = False
        for pattern in BOILERPLATE:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.lstrip(" ,:;-"), True
    return text


def starts_with_trigger(caption: str, trigger: str) -> bool:
    return re.match(rf"\s*{re.escape(trigger)}(?!\w)", caption) is not None


def _fit(tags: List[str], separator: str, limit: int, keep: int) -> List[str]:
    """Drop tags from the end (the first `keep` stay) until the estimate fits; cut the last one by words."""
    while len(tags) > keep and estimate_clip_tokens(join_tags(tags, separator)) > limit:
        last = tags.pop()
        if len(tags) == keep:  # nothing else to drop: keep as many words of this tag as fit
            words = last.split()
            while words and estimate_clip_tokens(join_tags(tags + [" ".join(words)], separator)) > limit:
                words.pop()
            if words:
                tags.append(" ".join(words))
    return tags


def postprocess(raw: str, s: PostSettings) -> str:
    """The training caption for a raw answer (may be empty when the answer was only boilerplate)."""
    tags = split_tags(strip_boilerplate(raw), s.separator)
    keep = 0
    if s.add_trigger:
        if not (tags and starts_with_trigger(tags[0], s.trigger)):
            tags.insert(0, s.trigger)
        keep = 1
    if s.max_length is not None:
        tags = _fit(tags, s.separator, s.max_length, keep)
    return join_tags(tags, s.separator)
