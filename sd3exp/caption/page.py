"""stage=review: `<run>/review.html`, every image with the caption it trains on.

Per image: a thumbnail (`<run>/review/thumbs/`, JPEG, redone when the image
changes), the caption, where it comes from (user / model / none), the audit's flags
and the file to edit; filters by flag and concept (a little inline script that only
shows and hides cards); the tag frequency table. Opens from disk: relative links,
no server, nothing fetched. Jinja with StrictUndefined and autoescape.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import jinja2
from PIL import Image, ImageOps

from sd3exp import console
from sd3exp.audit import AuditReport, ConceptAudit
from sd3exp.evaluate.report import href
from sd3exp.io import write_bytes, write_text
from sd3exp.layout import RunLayout
from sd3exp.project import TEMPLATES
from sd3exp.schema import ConceptConfig, ExperimentConfig
from sd3exp.tag_shuffle import estimate_clip_tokens

TEMPLATE = "review.html.j2"
THUMB = 256
TAG_ROWS = 200
PROGRESS_MIN = 100  # images; fewer make no progress bar
FLAGS = {  # slug -> label
    "no-caption": "no caption", "empty": "empty", "missing-trigger": "missing trigger",
    "trigger-not-first": "trigger not first", "long": "over 77 CLIP tokens", "duplicate": "duplicate image",
    "same-caption": "same caption as another image", "unreadable": "unreadable image", "not-utf8": "not UTF-8",
}


def thumbnail(image: Path, out: Path) -> Optional[Path]:
    """A JPEG thumbnail of `image` (kept while newer than the image); None when it cannot be read."""
    try:
        if out.is_file() and out.stat().st_mtime_ns >= image.stat().st_mtime_ns:
            return out
        with Image.open(image) as opened:
            im = ImageOps.exif_transpose(opened).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            im.save(buffer, "JPEG", quality=85)
    except Exception:  # any of Pillow's many errors for a bad file: the page says "unreadable"
        return None
    write_bytes(out, buffer.getvalue())
    return out


def _flags(a: ConceptAudit, image: str, caption_name: str) -> List[str]:
    found = {
        "no-caption": image in a.missing_captions,
        "empty": caption_name in a.empty_captions,
        "missing-trigger": caption_name in a.lacking_trigger,
        "trigger-not-first": caption_name in a.trigger_not_first,
        "long": caption_name in a.long_captions,
        "duplicate": any(image in group for group in a.duplicates),
        "unreadable": image in a.unreadable,
        "not-utf8": caption_name in a.undecodable_captions,
    }
    return [slug for slug, on in found.items() if on]


def _edit_hint(source: str, user_file: Path, prefer: str) -> str:
    if source == "user":
        return f"edit {user_file}"
    if source == "model" and prefer == "model":
        return (f"generated (captioner.prefer=model wins over {user_file.name}): change captioner.prompt and "
                f"re-run stage=caption, or set captioner.prefer=user and edit {user_file}")
    if source == "model":
        return f"generated: to replace it, write your caption to {user_file} (yours are used first)"
    return f"write {user_file}"


def _caption_of(user_file: Path, generated: Dict[str, str], image: str) -> tuple[str, str]:
    if image in generated:
        return "model", generated[image]
    if user_file.is_file():
        return "user", user_file.read_bytes().decode("utf-8", "replace")
    return "none", ""


def concept_cards(c: ConceptConfig, a: ConceptAudit, generated: Dict[str, str], run_dir: Path,
                  prefer: str) -> List[Dict[str, Any]]:
    cards, folder = [], Path(c.path)
    for name in console.progress(a.images, desc=f"review {c.id}", unit="image", leave=False,
                                 disable=len(a.images) < PROGRESS_MIN):
        image, user_file = folder / name, (folder / name).with_suffix(".txt")
        source, text = _caption_of(user_file, generated, name)
        thumb = thumbnail(image, run_dir / "review" / "thumbs" / c.id / f"{name}.jpg")
        cards.append({"concept": c.id, "image": name, "path": str(image), "caption": text, "source": source,
                      "tokens": estimate_clip_tokens(text), "edit": _edit_hint(source, user_file, prefer),
                      "flags": _flags(a, name, user_file.name),
                      "thumb": href(thumb, run_dir) if thumb else None})
    repeated = Counter(card["caption"].strip() for card in cards if card["caption"].strip())
    for card in cards:
        if repeated[card["caption"].strip()] > 1:
            card["flags"].append("same-caption")
    return cards


def review_context(cfg: ExperimentConfig, report: AuditReport, generated: Dict[str, Dict[str, str]],
                   run_dir: Path) -> Dict[str, Any]:
    concepts = {c.id: c for c in cfg.concepts}
    cards = [card for a in report.concepts if a.found
             for card in concept_cards(concepts[a.id], a, generated.get(a.id, {}), run_dir, cfg.captioner.prefer)]
    counts = Counter(flag for card in cards for flag in card["flags"])
    return {
        "title": cfg.name, "cards": cards, "flags": FLAGS, "flag_counts": counts,
        "sources": Counter(card["source"] for card in cards),
        "concepts": [{"id": a.id, "path": a.path, "images": len(a.images),
                      "tags": list(a.tag_counts.items())[:TAG_ROWS],
                      "more_tags": max(0, len(a.tag_counts) - TAG_ROWS)} for a in report.concepts],
        "errors": report.errors, "warnings": report.warnings,
        "audit_json": href(RunLayout(run_dir).audit, run_dir),
    }


def render_review(context: Dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=True, keep_trailing_newline=True)
    return env.get_template(TEMPLATE).render(**context)


def write_review(cfg: ExperimentConfig, report: AuditReport, generated: Dict[str, Dict[str, str]],
                 run_dir: Path) -> Path:
    """Write `<run>/review.html` atomically; its path."""
    out = RunLayout(run_dir).review
    write_text(out, render_review(review_context(cfg, report, generated, run_dir)))
    return out
