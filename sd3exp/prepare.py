"""Prepare every concept into ``<dataset.prepared_dir>/<concept id>/`` for SimpleTuner.

SimpleTuner writes bucket indices and metadata into its instance_data_dir, so it
never gets the user's folder: each concept is prepared into a folder of its own,
which the compiler points instance_data_dir at. The source folder is only read.

- native mode, or shuffle off: every image once, with its caption as is.
- materialized mode: R = repeats copies ``name_<i>.<ext>`` + ``name_<i>.txt``
  (i = 1..R), each caption shuffled with its own seed (sd3exp.tag_shuffle).

Images are placed with the first method that works: hard link (no image bytes),
symlink, reflink, byte copy. Captions are small and always written, never
linked, so nothing written into a prepared folder can reach the source.
An image without a caption stops preparation (DatasetError) unless
captions.allow_missing, which gives it the trigger word as its caption.

Incremental and atomic: what the folder should hold is computed from the source
on every run and compared with the disk (images: same inode, or same size and
mtime; captions: same bytes). If it all matches nothing is touched, so
SimpleTuner's metadata stays. Otherwise a new folder is built next to the
target (``.<id>.building``: unchanged files hard-linked from the current
folder, the rest created) and swapped in with two renames. A run killed at any
point leaves the old or the new folder (between the two renames:
``.<id>.old``, which the next run puts back), and the next run gives the same
result as an uninterrupted one. (Interruption-safe, not power-loss-safe: no fsync.)
A re-run whose inputs (settings, seed, generated captions, each source file's name, inode, size and
mtime, the captions' bytes), manifest record and folders (inode, mtime) are as the last prepare left
them skips even that comparison (noted in ``$XDG_CACHE_HOME/sd3exp/prepared/``): a file edited in
place inside a prepared folder is then not noticed; one added, removed or renamed there is.
The seed and settings are recorded in ``<prepared_dir>/sd3exp-prepare.json``.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from sd3exp import console, holdout, tag_shuffle
from sd3exp.errors import ConfigError, DatasetError, human_bytes
from sd3exp.images import IMAGE_EXTENSIONS, list_images
from sd3exp.io import atomic_dir, read_json, recover_dir, remove_stale_temporaries, user_cache, write_json
from sd3exp.schema import ConceptConfig, ExperimentConfig

if sys.platform == "win32":  # no fcntl on Windows: reflink is skipped there
    fcntl = None
else:
    import fcntl

MANIFEST = "sd3exp-prepare.json"
PREPARED, PREPARING = "prepared", "preparing (stopped before its folder was complete)"  # a concept's "state"
FORMAT = 1
FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, xfs, ...)
PROGRESS_MIN_FILES = 200
Want = Union[Path, bytes]
StrPath = Union[str, Path]  # an image's source file, or a caption's content


@dataclass
class ConceptSummary:
    id: str
    mode: str  # native | materialized
    images: int
    files: int  # image files in the prepared folder (images x copies)
    created: int = 0  # files (images and captions) made this run
    reused: int = 0
    removed: int = 0
    bytes_written: int = 0
    link_modes: Dict[str, int] = field(default_factory=dict)
    captions_from_trigger: List[str] = field(default_factory=list)
    captions_generated: int = 0  # images trained on a caption of the caption store (stage=caption)
    held_out: List[str] = field(default_factory=list)  # images in <id>.holdout/, for the validation loss


@dataclass
class PrepareSummary:
    prepared_dir: str
    concepts: List[ConceptSummary]
    seconds: float

    def total(self, key: str) -> int:
        return sum(getattr(c, key) for c in self.concepts)

    def line(self) -> str:
        """One line: images, copies, what was done, bytes written, link modes, time."""
        links: Counter = Counter()
        for c in self.concepts:
            links.update(c.link_modes)
        t = self.total
        work = (f"{t('created')} file(s) created, {t('reused')} reused, {t('removed')} removed"
                if t("created") or t("removed") else "unchanged")
        how = ", ".join(f"{m} {n}" for m, n in links.items()) or "none needed"
        generated = f" ({t('captions_generated')} with generated captions)" if t("captions_generated") else ""
        held = sum(len(c.held_out) for c in self.concepts)
        generated += f" (+{held} held out for the validation loss)" if held else ""
        return (f"prepared {len(self.concepts)} concept(s) in {self.prepared_dir}: {t('images')} images{generated} -> "
                f"{t('files')} image files; {work}; {human_bytes(t('bytes_written'))} written; "
                f"images placed by: {how}; {self.seconds:.2f} s")


# -- placing images ---------------------------------------------------------

def _hardlink(src: Path, dst: StrPath) -> int:
    os.link(src, dst)
    return 0


def _symlink(src: Path, dst: StrPath) -> int:
    os.symlink(os.path.abspath(src), dst)
    return 0


def _reflink(src: Path, dst: StrPath) -> int:
    if fcntl is None:
        raise OSError(errno.ENOTSUP, "reflink needs fcntl")
    with open(src, "rb") as s, open(dst, "xb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
    shutil.copystat(src, dst)
    return 0


def _copy(src: Path, dst: StrPath) -> int:
    shutil.copy2(src, dst)
    return os.stat(dst).st_size


PLACERS: Dict[str, Callable[[Path, StrPath], int]] = {
    "hardlink": _hardlink, "symlink": _symlink, "reflink": _reflink, "copy": _copy}
# errors meaning "this method does not work here" (other errors, e.g. a vanished source, are raised)
UNSUPPORTED = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
               errno.ENOTTY, errno.EINVAL, errno.ENOSYS}


class Linker:
    """Places images with the first method that works here; a method that fails is not tried again."""

    def __init__(self) -> None:
        self.modes = list(PLACERS)
        self.used: Counter = Counter()
        self.bytes = 0

    def place(self, src: Path, dst: StrPath) -> None:
        while True:
            mode = self.modes[0]
            try:
                self.bytes += PLACERS[mode](src, dst)
                self.used[mode] += 1
                return
            except OSError as e:
                if len(self.modes) == 1 or e.errno not in UNSUPPORTED:
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dst)
                self.modes.pop(0)


# -- what a concept folder should hold ---------------------------------------

def source_images(concept: ConceptConfig) -> List[Path]:
    """The concept's images; DatasetError if the folder is missing or two images share a caption."""
    folder = Path(concept.path)
    if not folder.is_dir():
        raise DatasetError(f"concept '{concept.id}': folder {folder.absolute()} not found")
    images = list_images(folder)
    clashes = shared_stems(images)
    if clashes:
        raise DatasetError(f"concept '{concept.id}': images share a caption file: {'; '.join(clashes)}. "
                           "Rename them so each image has its own <name>.txt")
    return images


def shared_stems(images: List[Path]) -> List[str]:
    """Groups like 'a.png, a.jpg': images whose caption file would be the same."""
    by_stem: Dict[str, List[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p.name)
    return [", ".join(names) for names in by_stem.values() if len(names) > 1]


def _caption_bytes(image: Path) -> bytes | None:
    """The image's caption file without a UTF-8 byte-order mark (an editor's, not caption text)."""
    path = image.with_suffix(".txt")
    return path.read_bytes().removeprefix(codecs.BOM_UTF8) if path.is_file() else None


def _decode(concept: ConceptConfig, image: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"concept '{concept.id}': caption {image.with_suffix('.txt')} is not UTF-8 ({e})") from e


@dataclass
class Layout:
    """What a prepared folder should hold: {file name: source image or caption bytes}."""

    files: Dict[str, Want]
    images: int
    captions_from_trigger: List[str]
    held_out: Dict[str, Want] = field(default_factory=dict)  # the eval folder: held-out images, captions as is


def _copies(concept: ConceptConfig, image: Path, text: str, seed: int) -> Dict[str, Want]:
    """Materialized mode: name_<i>.<ext> + name_<i>.txt, i = 1..repeats, each caption shuffled on its own."""
    sep, keep = tag_shuffle.tag_separator(concept), concept.captions.keep_tags
    files: Dict[str, Want] = {}
    tags = tag_shuffle.split_tags(text, sep)  # once per image, not per copy
    name, stem, suffix = image.name, image.stem, image.suffix
    rng = random.Random(0)
    for i in range(1, concept.repeats + 1):
        rng.seed(tag_shuffle.copy_seed(seed, concept.id, name, i))  # as random.Random(that seed)
        files[f"{stem}_{i}{suffix}"] = image
        files[f"{stem}_{i}.txt"] = tag_shuffle.shuffle_tags(tags, keep, rng, sep).encode("utf-8")
    return files


_LAYOUTS: Dict[str, tuple] = {}  # concept id -> (its inputs, its layout): the last one built in this process


def layout(concept: ConceptConfig, seed: int, generated: Optional[Dict[str, str]] = None) -> Layout:
    """The prepared folder of `concept`; DatasetError for images without a caption (unless allowed).
    `generated`: {image name: caption} of the images that train on a generated caption. Held-out images
    (concept.holdout, chosen with the experiment's `seed`) go to `held_out`, once each, caption unshuffled.
    Built once while the settings, image names and caption bytes stay the same (the cache key and
    prepare() share it)."""
    images = source_images(concept)
    generated = generated or {}
    data = {p.name: generated[p.name].encode("utf-8") if p.name in generated else _caption_bytes(p) for p in images}
    inputs = (repr(concept), seed, data)
    last = _LAYOUTS.get(concept.id)
    if last is not None and last[0] == inputs:
        return last[1]
    lay = _build_layout(concept, seed, images, data)
    _LAYOUTS[concept.id] = (inputs, lay)
    return lay


def _build_layout(concept: ConceptConfig, seed: int, images: List[Path], texts: Dict[str, Optional[bytes]]) -> Layout:
    held = set(holdout.held_out(concept, [p.name for p in images], seed))
    seed = tag_shuffle.shuffle_seed(concept, seed)
    files: Dict[str, Want] = {}
    held_files: Dict[str, Want] = {}
    missing: List[str] = []
    from_trigger: List[str] = []
    for image in images:
        data = texts[image.name]
        if data is None:
            (from_trigger if concept.captions.allow_missing else missing).append(image.name)
            data = concept.trigger.encode("utf-8")
        if image.name in held:
            held_files[image.name], held_files[image.stem + ".txt"] = image, data
        elif tag_shuffle.materialized(concept):
            files.update(_copies(concept, image, _decode(concept, image, data), seed))
        else:
            files[image.name], files[image.stem + ".txt"] = image, data
    if missing:
        raise DatasetError(f"concept '{concept.id}': {len(missing)} image(s) without a caption file: "
                           f"{_names(missing)}. Add <name>.txt files, or set captions.allow_missing=true "
                           "(they are then captioned with the trigger word)")
    return Layout(files, len(images) - len(held), from_trigger, held_files)


def inputs_digest(concept: ConceptConfig, seed: int, generated: Optional[Dict[str, str]] = None) -> Optional[str]:
    """sha256 of all the concept's prepared folders follow from: its settings, the seed, the generated
    captions, and each source file's name, inode, size and mtime (captions also by their bytes);
    None when the folder cannot be read."""
    import hashlib

    h = hashlib.sha256(repr((str(Path(concept.path).absolute()), concept, seed,
                             sorted((generated or {}).items()))).encode("utf-8"))
    try:
        with os.scandir(concept.path) as found:
            entries = sorted(found, key=lambda e: e.name)
        for e in entries:
            st = e.stat()
            h.update(f"{e.name}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            if e.name.endswith(".txt") and e.is_file():
                h.update(Path(e.path).read_bytes())
    except OSError:
        return None
    return h.hexdigest()


def _names(names: List[str], limit: int = 10) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _managed(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return suffix == ".txt" or suffix in IMAGE_EXTENSIONS


def _existing(target: Path) -> List[str]:
    """Our files in the prepared folder (SimpleTuner's metadata files are not ours)."""
    return sorted(p.name for p in target.iterdir() if _managed(p.name)) if target.is_dir() else []


def _matches(want: Want, path: Path) -> bool:
    try:
        if isinstance(want, bytes):
            return not path.is_symlink() and path.read_bytes() == want
        a, b = want.stat(), path.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


# -- building (sd3exp.io.atomic_dir swaps it in) -------------------------------------------------

def _build(build: Path, target: Path, files: Dict[str, Want], reusable: set, summary: ConceptSummary,
           progress: bool) -> None:
    """Fill `build` with `files`, reusing the unchanged ones of `target` by hard link. Captions are
    written through raw file descriptors relative to the build folder, neither atomically nor fsynced:
    the whole folder is renamed into place when complete (a kill leaves it under its building name)."""
    linker = Linker()
    bar = console.progress(files.items(), desc=f"prepare {summary.id}", unit="file", leave=False,
               disable=not progress or len(files) < PROGRESS_MIN_FILES)
    here, there = os.fspath(build) + os.sep, os.fspath(target) + os.sep
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    created = written = reused = 0
    folder = os.open(build, os.O_RDONLY) if os.open in os.supports_dir_fd else None
    try:
        for name, want in bar:
            if name in reusable and _relink(there + name, here + name):
                reused += 1
            elif isinstance(want, bytes):
                fd = os.open(name, flags, 0o666, dir_fd=folder) if folder is not None else \
                    os.open(here + name, flags, 0o666)
                try:
                    view = memoryview(want)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                written += len(want)
                created += 1
            else:
                linker.place(want, here + name)
                created += 1
    finally:
        if folder is not None:
            os.close(folder)
        summary.reused += reused
        summary.created += created
        summary.bytes_written += written + linker.bytes
        summary.link_modes = dict(Counter(summary.link_modes) + linker.used)


def _relink(existing: str, dst: str) -> bool:
    """Reuse a file of the current folder (a symlink stays a symlink)."""
    try:
        os.link(existing, dst, follow_symlinks=False)
    except OSError:
        return False
    return True


def _prepare_concept(target: Path, summary: ConceptSummary, files: Dict[str, Want], progress: bool) -> None:
    recover_dir(target)
    existing = _existing(target)
    reusable = {n for n in existing if n in files and _matches(files[n], target / n)}
    summary.removed += len(set(existing) - set(files))
    if len(reusable) == len(files) and not summary.removed:
        return
    with atomic_dir(target) as build:
        _build(build, target, files, reusable, summary, progress)


def _prepare_held_out(target: Path, summary: ConceptSummary, files: Dict[str, Want], ours: bool,
                      progress: bool) -> None:
    """The eval folder of the held-out images; when none are held out any more, the one an earlier
    prepare made (`ours`: the manifest recorded it) is removed."""
    if files:
        _prepare_concept(target, summary, files, progress)
    elif ours and target.is_dir():
        shutil.rmtree(target)


# -- the manifest and the guards -----------------------------------------

def _record(concept: ConceptConfig, seed: int, summary: ConceptSummary) -> dict:
    cap = concept.captions
    return {"source": str(Path(concept.path).absolute()), "mode": summary.mode, "passes": concept.repeats,
            "simpletuner_repeats": tag_shuffle.simpletuner_repeats(concept),
            "copies_per_image": concept.repeats if summary.mode == "materialized" else 1,
            "shuffle": cap.shuffle, "keep_tags": cap.keep_tags, "separator": cap.separator,
            "seed": tag_shuffle.shuffle_seed(concept, seed),
            "caption_shuffle": tag_shuffle.native_shuffle_block(concept, seed),
            "images": summary.images, "files": summary.files,
            "captions_from_trigger": summary.captions_from_trigger, "state": PREPARED,
            **({"held_out": summary.held_out, "held_out_seed": seed} if summary.held_out else {})}


def _checked_file(root: Path) -> Path:
    """sd3exp's note of each concept's folders as its last prepare left them, in the user cache
    ($XDG_CACHE_HOME/sd3exp/prepared/), not the prepared folder: equal settings give equal prepared folders."""
    import hashlib

    return user_cache() / "prepared" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]}.json"


def _read_checked(root: Path) -> dict:
    try:
        data = read_json(_checked_file(root))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_checked(root: Path, checked: dict) -> None:
    if checked != _read_checked(root):
        try:
            write_json(_checked_file(root), checked)
        except OSError:
            pass  # only a speed-up: the next prepare checks every file


def _verified(root: Path, concept: ConceptConfig, inputs: str, record: dict) -> dict:
    """What lets a prepare skip a concept: the same inputs (inputs_digest), manifest record, and inode
    and mtime of its folders (a file added, removed or renamed in them changes their mtime; a file
    edited in place inside them is not noticed)."""
    stamps = []
    for folder in (root / concept.id, root / holdout.folder_name(concept.id)):
        st = folder.stat() if folder.is_dir() else None
        stamps.append([st.st_ino, st.st_mtime_ns] if st else None)
    return {"inputs": inputs, "record": record, "folders": stamps}


def _summary_of(concept: ConceptConfig, record: dict, generated: int) -> ConceptSummary:
    """The summary of a concept that needs nothing done, from its manifest record."""
    return ConceptSummary(concept.id, record["mode"], record["images"], record["files"],
                          captions_from_trigger=record["captions_from_trigger"], captions_generated=generated,
                          held_out=record.get("held_out", []))


def _marked(manifest: dict, ids: List[str], state: str) -> dict:
    """`manifest` with the concepts `ids` in `state`."""
    return {**manifest, "concepts": {k: {**v, "state": state} if k in ids else v
                                     for k, v in manifest["concepts"].items()}}


def _read_manifest(path: Path) -> dict:
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is unreadable ({e}); delete it together with the prepared folders") from e
    return data if isinstance(data, dict) else {}


def _check_paths(cfg: ExperimentConfig, root: Path, owned: dict) -> None:
    """Never write into a source folder, nor replace a folder sd3exp did not make."""
    for c in cfg.concepts:
        src = Path(c.path).resolve()
        for target, mine in ((root / c.id).resolve(), c.id in owned), \
                ((root / holdout.folder_name(c.id)).resolve(), "held_out" in owned.get(c.id, {})):
            if src == root or src in root.parents or src == target or target in src.parents:
                raise ConfigError("dataset.prepared_dir", cfg.dataset.prepared_dir,
                                  f"overlaps the source folder of concept '{c.id}' ({src}), which must stay untouched",
                                  "prepare into a folder outside the source folders (default: <run>/dataset)")
            if not mine and target.is_dir() and any(target.iterdir()):
                raise DatasetError(f"{target} exists but was not made by sd3exp prepare (no entry in "
                                   f"{root / MANIFEST}); move it away or choose another dataset.prepared_dir")


def prepare(cfg: ExperimentConfig, progress: bool = True) -> PrepareSummary:
    """Build `<prepared_dir>/<id>/` for every concept; DatasetError/ConfigError before writing anything."""
    from sd3exp.caption.sources import generated_captions

    start = time.perf_counter()
    root = Path(cfg.dataset.prepared_dir).absolute()
    old = _read_manifest(root / MANIFEST)
    _check_paths(cfg, root, old.get("concepts", {}))
    plans: List[Tuple[ConceptConfig, Optional[Layout], Optional[str], ConceptSummary]] = []
    records, checked = dict(old.get("concepts", {})), _read_checked(root)
    for c in cfg.concepts:
        generated = generated_captions(c, cfg.captioner)
        inputs, was = inputs_digest(c, cfg.seed, generated), old.get("concepts", {}).get(c.id, {})
        if inputs is not None and was.get("state") == PREPARED and checked.get(c.id) == _verified(root, c, inputs, was):
            plans.append((c, None, inputs, _summary_of(c, was, len(generated))))  # as the last prepare left it
            continue
        lay = layout(c, cfg.seed, generated)
        mode = "materialized" if tag_shuffle.materialized(c) else "native"
        files = sum(not isinstance(w, bytes) for w in lay.files.values())
        summary = ConceptSummary(c.id, mode, lay.images, files, captions_from_trigger=lay.captions_from_trigger,
                                 captions_generated=len(generated),
                                 held_out=sorted(n for n, w in lay.held_out.items() if not isinstance(w, bytes)))
        plans.append((c, lay, inputs, summary))
        records[c.id] = _record(c, cfg.seed, summary)
    manifest = {"format": FORMAT, "seed": cfg.seed, "concepts": dict(sorted(records.items()))}
    remove_stale_temporaries(root)  # a manifest write cut short by a kill
    if manifest != old:  # first the folders are claimed (the guards above), marked as not prepared yet
        write_json(root / MANIFEST, _marked(manifest, [c.id for c, planned, _, _ in plans if planned], PREPARING))
    for c, planned, inputs, summary in plans:
        if planned is None:
            continue
        _prepare_concept(root / c.id, summary, planned.files, progress)
        ours = "held_out" in old.get("concepts", {}).get(c.id, {})
        _prepare_held_out(root / holdout.folder_name(c.id), summary, planned.held_out, ours, progress)
        if inputs is not None:
            checked[c.id] = _verified(root, c, inputs, records[c.id])
    if manifest != old:
        write_json(root / MANIFEST, manifest)
    _save_checked(root, checked)
    return PrepareSummary(str(root), [s for _, _, _, s in plans], time.perf_counter() - start)
