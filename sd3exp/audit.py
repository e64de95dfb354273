"""Audit each concept's source folder before training. Reads only; changes nothing.

Per concept: images without a caption, captions without an image, empty or
non-UTF-8 captions, captions lacking the trigger word or not starting with it,
unreadable or truncated images (Pillow verify + load), images smaller than
dataset.resolution asks for, duplicate images (sha256 of the bytes), captions likely over
CLIP's window, captions with fewer tags than keep_tags, multi-line captions,
kohya's "|||", files that are neither, a tag frequency table, and the image
sizes from their headers (EXIF rotation applied; the step planner uses them).

"Smaller than resolution" means smaller, on either side, than the size
SimpleTuner resizes the image to (sd3exp.buckets.target_size, its own rounding):
such images are upscaled. A plain shorter-side rule would flag every 1344x768
image at pixel_area 1024 although that is exactly its bucket. A warning, not an
error (images below minimum_image_size are skipped, which the planner reports).

Which findings stop training is a policy of the experiment (audit_errors).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional, Tuple

from PIL import Image

from sd3exp import holdout, tag_shuffle
from sd3exp.buckets import BucketRule, target_size
from sd3exp.images import IMAGE_EXTENSIONS, image_size, list_images, problem
from sd3exp.io import dumps_json, write_if_changed
from sd3exp.plan import bucket_rule
from sd3exp.prepare import shared_stems
from sd3exp.schema import ConceptConfig, DatasetConfig, ExperimentConfig
from sd3exp.sourcefacts import SourceFacts
from sd3exp.tag_shuffle import estimate_clip_tokens

Size = Tuple[int, int]
# Files sd3exp and SimpleTuner keep beside the images themselves (manifests, bucket caches).
KNOWN_FILES = ("sd3exp-", "aspect_ratio_bucket_")
CLIP_TOKENS = 75  # CLIP's 77-token window minus the start and end tokens
KEEP_SEPARATOR = "|||"
LIST_LIMIT = 8


@dataclass
class ConceptAudit:
    id: str
    path: str
    found: bool
    images: List[str] = field(default_factory=list)
    sizes: List[Size] = field(default_factory=list)  # of the readable images, in name order
    missing_captions: List[str] = field(default_factory=list)
    orphan_captions: List[str] = field(default_factory=list)
    empty_captions: List[str] = field(default_factory=list)
    undecodable_captions: List[str] = field(default_factory=list)
    lacking_trigger: List[str] = field(default_factory=list)
    trigger_not_first: List[str] = field(default_factory=list)
    unreadable: Dict[str, str] = field(default_factory=dict)  # image -> Pillow's error
    too_small: Dict[str, Size] = field(default_factory=dict)
    duplicates: List[List[str]] = field(default_factory=list)
    long_captions: Dict[str, int] = field(default_factory=dict)  # caption -> estimated tokens
    too_few_tags: Dict[str, int] = field(default_factory=dict)  # caption -> tag count < keep_tags
    shared_stems: List[str] = field(default_factory=list)
    multiline: List[str] = field(default_factory=list)
    keep_separator: List[str] = field(default_factory=list)
    ignored_files: List[str] = field(default_factory=list)
    other_formats: List[str] = field(default_factory=list)  # images Pillow opens in a format sd3exp does not prepare
    image_subfolders: List[str] = field(default_factory=list)  # subfolders holding images
    tag_counts: Dict[str, int] = field(default_factory=dict)
    generated_captions: List[str] = field(default_factory=list)  # images audited on their generated caption
    held_out: List[str] = field(default_factory=list)  # audited too, but not trained on (concepts[].holdout)


@dataclass
class AuditReport:
    concepts: List[ConceptAudit]
    errors: List[str]
    warnings: List[str]


def upscaled(size: Size, rule: BucketRule) -> bool:
    """Whether SimpleTuner enlarges an image of `size` to its training size."""
    tw, th = target_size(size, rule)
    return size[0] < tw or size[1] < th


def _inspect(path: Path) -> Tuple[str, Optional[Size], Optional[str], Optional[str]]:
    """(name, size, sha256, error): Pillow's verify() on the header, then a full decode."""
    digest = None
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return path.name, image_size(path), digest, None
    except Exception as e:  # an OSError, or any of the many types Pillow raises for bad files
        return path.name, None, digest, problem(path, e)


def _check_images(a: ConceptAudit, images: List[Path], rule: BucketRule, facts: SourceFacts) -> None:
    """Each image inspected once per content: its result is kept in `facts` (unless it could not be read)."""
    entries = {p.name: facts.entry(p) for p in images}
    todo = [p for p in images if "audit" not in entries[p.name]]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        fresh = {name: (size, digest, error) for name, size, digest, error in pool.map(_inspect, todo)}
    for name, (size, digest, error) in fresh.items():
        if digest:
            facts.changed = True
            entries[name].update(sha256=digest, audit=[size, error])
    by_hash: Dict[str, List[str]] = {}
    for name, e in entries.items():
        size, error = e["audit"] if "audit" in e else fresh[name][0::2]
        digest = e.get("sha256")
        if digest:
            by_hash.setdefault(digest, []).append(name)
        if error:
            a.unreadable[name] = error
            continue
        assert size is not None, name  # a header read without an error gave the size
        a.sizes.append(tuple(size))
        if upscaled(tuple(size), rule):
            a.too_small[name] = tuple(size)
    a.duplicates = [names for names in by_hash.values() if len(names) > 1]


def _check_caption(a: ConceptAudit, c: ConceptConfig, name: str, text: str, tags: Counter) -> None:
    trigger = re.escape(c.trigger)
    if not text.strip():
        a.empty_captions.append(name)
        return
    if not re.search(rf"(?<!\w){trigger}(?!\w)", text):
        a.lacking_trigger.append(name)
    elif not re.match(rf"\s*{trigger}(?!\w)", text):
        a.trigger_not_first.append(name)
    found = tag_shuffle.split_tags(text, tag_shuffle.tag_separator(c))
    tags.update(found)
    if len(found) < c.captions.keep_tags:
        a.too_few_tags[name] = len(found)
    if estimate_clip_tokens(text) > CLIP_TOKENS:
        a.long_captions[name] = estimate_clip_tokens(text)
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        a.multiline.append(name)
    if KEEP_SEPARATOR in text:
        a.keep_separator.append(name)


def other_image_format(p: Path) -> bool:
    """An image Pillow opens (so SimpleTuner would read it, e.g. a GIF) that sd3exp does not prepare."""
    fmt = Image.registered_extensions().get(p.suffix.lower())
    return fmt in Image.OPEN and p.suffix.lower() not in IMAGE_EXTENSIONS


def holds_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTENSIONS or other_image_format(f) for f in folder.rglob("*"))


def _check_captions(a: ConceptAudit, c: ConceptConfig, images: List[Path], generated: Dict[str, str]) -> None:
    """The captions training reads: the user's <stem>.txt, or the generated one for the images in
    `generated` (named <stem>.txt too, and listed in a.generated_captions)."""
    by_stem = {p.stem: p.name for p in images if p.name in generated}
    folder = sorted(Path(c.path).iterdir(), key=lambda p: p.name)  # one folder: by name is by path
    a.other_formats = [p.name for p in folder if p.is_file() and other_image_format(p)]
    a.image_subfolders = [p.name + "/" for p in folder if p.is_dir() and not p.name.startswith(".") and holds_images(p)]
    stems = {p.stem for p in images}
    captioned = stems | {Path(name).stem for name in a.other_formats}
    tags: Counter = Counter()
    for p in folder:
        if p.name.startswith(".") or p.name in a.other_formats or p.name + "/" in a.image_subfolders:
            continue
        if p.suffix == ".txt" and p.is_file():  # SimpleTuner reads <stem>.txt, lower case
            if p.stem not in captioned:
                a.orphan_captions.append(p.name)
                continue
            if p.stem in by_stem or p.stem not in stems:  # a generated caption is used; another format's is not
                continue
            try:
                text = p.read_bytes().decode("utf-8-sig")  # a BOM is not caption text: prepare drops it
            except UnicodeDecodeError:
                a.undecodable_captions.append(p.name)
                continue
            _check_caption(a, c, p.name, text, tags)
        elif (p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file()) and not p.name.startswith(KNOWN_FILES):
            a.ignored_files.append(p.name + ("/" if p.is_dir() else ""))
    for p in images:
        if p.name in generated:
            a.generated_captions.append(p.name)
            _check_caption(a, c, f"{p.stem}.txt", generated[p.name], tags)
    a.missing_captions = [p.name for p in images if p.name not in generated and not p.with_suffix(".txt").is_file()]
    a.tag_counts = dict(tags.most_common())


def audit_concept(c: ConceptConfig, rule: BucketRule, generated: Optional[Dict[str, str]] = None) -> ConceptAudit:
    """`generated`: {image name: caption} of the images that train on a generated caption.
    Image results are reused from sd3exp.sourcefacts while an image's size and mtime are unchanged."""
    folder = Path(c.path)
    a = ConceptAudit(c.id, str(folder.absolute()), folder.is_dir())
    if not a.found:
        return a
    images = list_images(folder)
    a.images = [p.name for p in images]
    a.shared_stems = shared_stems(images)
    facts = SourceFacts(folder)
    _check_images(a, images, rule, facts)
    facts.save()
    _check_captions(a, c, images, generated or {})
    return a


def _names(items) -> str:
    names = [" = ".join(i) if isinstance(i, list) else str(i) for i in items]
    more = f" ... and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else ""
    return ", ".join(names[:LIST_LIMIT]) + more


def _rules(a: ConceptAudit, c: ConceptConfig, ds: DatasetConfig) -> List[Tuple[bool, Collection[Any], str, str]]:
    """(stops training?, offending items, what they are, the fix) for one concept."""
    cap, lenient = c.captions, c.captions.allow_missing
    return [
        (not lenient, a.missing_captions, "image(s) without a caption file",
         "add <name>.txt, or set captions.allow_missing=true (captioned with the trigger word)"),
        (not lenient, a.orphan_captions, "caption file(s) without an image",
         "rename the caption to its image's name, or remove it"),
        (not lenient, a.empty_captions, "empty caption(s)", "write the captions"),
        (True, a.undecodable_captions, "caption(s) that are not UTF-8", "save them as UTF-8"),
        (True, [f"{name} ({why})" for name, why in a.unreadable.items()], "unreadable or truncated image(s)",
         "re-export them, or move them out of the folder"),
        (True, a.shared_stems, "image groups sharing one caption file", "give each image its own name"),
        (cap.require_trigger, a.lacking_trigger, f"caption(s) without the trigger word '{c.trigger}'",
         "add the trigger as the first tag, or set captions.require_trigger=false"),
        (cap.shuffle, a.too_few_tags, f"caption(s) with fewer tags than keep_tags={cap.keep_tags}",
         "lower captions.keep_tags or add tags"),
        (False, a.trigger_not_first, f"caption(s) not starting with the trigger '{c.trigger}'",
         "put the trigger first (with shuffle on it stays in place only within keep_tags)"),
        (False, a.too_small, f"image(s) below their {ds.resolution} {ds.resolution_type} training size (upscaled)",
         "use larger images or a lower dataset.resolution"),
        (False, a.duplicates, "group(s) of identical images", "remove the copies (repeats does that job)"),
        (False, a.long_captions, f"caption(s) likely over CLIP's {CLIP_TOKENS + 2}-token window",
         "shorten them; CLIP truncates the end (T5 reads on)"),
        (False, a.multiline, "multi-line caption(s): SimpleTuner takes each line as a caption",
         "join the lines unless that is meant"),
        (False, a.keep_separator, f"caption(s) with kohya's '{KEEP_SEPARATOR}' (not supported)",
         "remove it and use captions.keep_tags"),
        (False, a.ignored_files, "file(s) that are neither images nor captions (ignored)", "none needed"),
        (False, a.other_formats, f"image(s) in a format sd3exp does not train on (only {', '.join(IMAGE_EXTENSIONS)})",
         "convert them to PNG, or leave them out on purpose"),
        (True, a.image_subfolders, "subfolder(s) with images: SimpleTuner 4.10.1 reads subfolders, but sd3exp "
         "prepares a concept's top level only, so they would not be trained",
         "move their images up into the concept folder, or give each subfolder its own concept"),
    ]


def _messages(report: AuditReport, cfg: ExperimentConfig, errors: bool) -> List[str]:
    concepts = {c.id: c for c in cfg.concepts}
    out = []
    for a in report.concepts:
        if errors and not a.found:
            out.append(f"concept '{a.id}': folder {a.path} not found. Fix: point concepts[].path at it")
        elif errors and not a.images:
            out.append(f"concept '{a.id}': no images in {a.path}. Fix: add .png/.jpg/.webp images")
        for is_error, items, what, fix in _rules(a, concepts[a.id], cfg.dataset):
            if items and is_error == errors:
                out.append(f"concept '{a.id}': {len(items)} {what}: {_names(items)}. Fix: {fix}")
    return out


def audit_errors(report: AuditReport, cfg: ExperimentConfig) -> List[str]:
    """The findings that must stop training under this experiment's settings."""
    return _messages(report, cfg, errors=True)


def audit_warnings(report: AuditReport, cfg: ExperimentConfig) -> List[str]:
    return _messages(report, cfg, errors=False)


def audit(cfg: ExperimentConfig, generated: Optional[Dict[str, Dict[str, str]]] = None) -> AuditReport:
    """Audit every concept's source folder (reads only). `generated`: {concept id: {image: caption}}
    of the generated captions training uses (default: looked up in the caption store)."""
    from sd3exp.caption.sources import generated_captions

    rule = bucket_rule(cfg)
    if generated is None:
        generated = {c.id: generated_captions(c, cfg.captioner) for c in cfg.concepts}
    report = AuditReport([audit_concept(c, rule, generated[c.id]) for c in cfg.concepts], [], [])
    for c, a in zip(cfg.concepts, report.concepts):
        a.held_out = holdout.held_out(c, a.images, cfg.seed)
    report.errors, report.warnings = audit_errors(report, cfg), audit_warnings(report, cfg)
    return report


def write_audit(report: AuditReport, path: Path) -> str:
    """Write audit.json atomically (untouched when unchanged); return a short human summary."""
    write_if_changed(Path(path), dumps_json(asdict(report)))
    images = sum(len(a.images) - len(a.held_out) for a in report.concepts)
    held = sum(len(a.held_out) for a in report.concepts)
    held_note = f" (+{held} held out for the validation loss)" if held else ""
    lines = [f"audit: {len(report.concepts)} concept(s), {images} images{held_note}, {len(report.errors)} error(s), "
             f"{len(report.warnings)} warning(s) -> {path}"]
    lines += [f"  ERROR {m}" for m in report.errors] + [f"  warning {m}" for m in report.warnings]
    for a in report.concepts:
        top = ", ".join(f"{t} ({n})" for t, n in list(a.tag_counts.items())[:5])
        if top:
            lines.append(f"  top tags of '{a.id}': {top}")
    return "\n".join(lines)
