"""Dataset preparation: keep-N shuffled copies as hard links, incremental, atomic, source untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest
from PIL import Image

from sd3exp import prepare as prep
from sd3exp.errors import ConfigError, DatasetError
from sd3exp.project import ROOT
from sd3exp.schema import CaptionsConfig, ConceptConfig, DatasetConfig, ExperimentConfig
from sd3exp.tag_shuffle import split_tags

VOCAB = [f"tag{i}" for i in range(40)]


def write_dataset(folder: Path, n: int, seed: int = 0, size: tuple = (16, 16)) -> Path:
    """n tiny distinct PNGs with captions 'k4s4, style s, <4-8 random tags>'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        Image.new("RGB", size, (i % 256, i // 256, 7)).save(folder / f"img{i:04d}.png")
        tags = rng.sample(VOCAB, rng.randint(4, 8))
        (folder / f"img{i:04d}.txt").write_text(", ".join(["k4s4", f"style {i % 3}", *tags]), encoding="utf-8")
    return folder


def experiment(src: Path, prepared: Path, repeats: int = 10, seed: int = 42, **captions) -> ExperimentConfig:
    cap = CaptionsConfig(**{"shuffle": True, "keep_tags": 2, "mode": "materialized", **captions})
    concept = ConceptConfig(id="art", path=str(src), trigger="k4s4", repeats=repeats, captions=cap)
    return ExperimentConfig(seed=seed, concepts=[concept], dataset=DatasetConfig(prepared_dir=str(prepared)))


def tree_hash(folder: Path) -> str:
    """Names, kinds and contents of every file under folder (symlinks by target)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(b"L" + os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"D")
    return h.hexdigest()


def source_state(folder: Path) -> Dict[str, tuple]:
    """Content hash, size and mtime of every file (and the names of the folders) under a source folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                         p.stat().st_mtime_ns) if p.is_file() else ("dir",)
            for p in sorted(folder.rglob("*"))}


def captions_of(folder: Path) -> Dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """500 images prepared with 10 repeats, keep 2 (materialized)."""
    base = tmp_path_factory.mktemp("big")
    src = write_dataset(base / "src", 500)
    before = source_state(src)
    cfg = experiment(src, base / "run" / "dataset")
    summary = prep.prepare(cfg, progress=False)
    return base, src, cfg, summary, before


def test_every_copy_keeps_the_first_two_tags_and_permutes_the_rest(big):
    base, src, cfg, summary, _ = big
    out = base / "run" / "dataset" / "art"
    assert summary.total("images") == 500 and summary.total("files") == 5000
    produced = captions_of(out)
    assert len(produced) == 5000
    for image in sorted(src.glob("*.png")):
        original = split_tags(image.with_suffix(".txt").read_text(encoding="utf-8"))
        variants = set()
        for i in range(1, 11):
            tags = split_tags(produced[f"{image.stem}_{i}.txt"])
            assert tags[:2] == original[:2]
            assert sorted(tags[2:]) == sorted(original[2:])
            variants.add(tuple(tags))
        assert len(variants) > 1  # reshuffled per copy, not one shuffle copied ten times


def test_image_copies_are_hard_links_using_no_extra_image_bytes(big):
    base, src, _, summary, _ = big
    out = base / "run" / "dataset" / "art"
    assert summary.concepts[0].link_modes == {"hardlink": 5000}
    source_inodes = {p.stat().st_ino for p in src.glob("*.png")}
    copies = list(out.glob("*.png"))
    assert len(copies) == 5000 and {p.stat().st_ino for p in copies} == source_inodes
    assert all(p.stat().st_nlink == 11 for p in src.glob("*.png"))
    caption_bytes = sum(len(t.encode()) for t in captions_of(out).values())
    assert summary.total("bytes_written") == caption_bytes  # captions only


def test_same_seed_same_captions_other_seed_other_captions(big, tmp_path):
    base, src, cfg, _, _ = big
    again = prep.prepare(experiment(src, tmp_path / "same"), progress=False)
    assert again.total("created") == 10000
    assert tree_hash(tmp_path / "same") == tree_hash(base / "run" / "dataset")
    prep.prepare(experiment(src, tmp_path / "other", seed=7), progress=False)
    assert captions_of(tmp_path / "other" / "art") != captions_of(base / "run" / "dataset" / "art")


def test_no_change_rerun_touches_nothing(big):
    base, src, cfg, _, before = big
    out = base / "run" / "dataset" / "art"
    marker = out / "aspect_ratio_bucket_indices_art.json"  # what SimpleTuner leaves there
    marker.write_text("{}")
    inode = out.stat().st_ino
    summary = prep.prepare(cfg, progress=False)
    assert "unchanged" in summary.line() and summary.total("bytes_written") == 0
    assert out.stat().st_ino == inode and marker.is_file()
    marker.unlink()
    assert source_state(src) == before


def test_manifest_records_seed_and_settings_outside_the_concept_folder(big):
    base, _, _, _, _ = big
    manifest = json.loads((base / "run" / "dataset" / prep.MANIFEST).read_text())
    rec = manifest["concepts"]["art"]
    assert manifest["seed"] == 42 and rec["seed"] == 42
    assert (rec["mode"], rec["passes"], rec["simpletuner_repeats"]) == ("materialized", 10, 0)
    assert rec["copies_per_image"] == 10
    assert rec["keep_tags"] == 2 and rec["caption_shuffle"] is None
    assert not list((base / "run" / "dataset" / "art").glob("*.json"))


def test_incremental_rerun_redoes_only_what_changed(tmp_path):
    src = write_dataset(tmp_path / "src", 20)
    cfg = experiment(src, tmp_path / "prepared", repeats=3)
    prep.prepare(cfg, progress=False)
    (src / "img0000.txt").write_text("k4s4, style 0, edited, tags here", encoding="utf-8")
    (src / "img0001.png").unlink()
    (src / "img0001.txt").unlink()
    write_dataset(tmp_path / "extra", 1, seed=9)
    for p in (tmp_path / "extra").iterdir():
        os.replace(p, src / p.name.replace("img0000", "new"))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "img0002.tmp.png")
    os.replace(src / "img0002.tmp.png", src / "img0002.png")  # new content, new inode
    summary = prep.prepare(cfg, progress=False).concepts[0]
    assert summary.removed == 6  # img0001 x 3 copies, image + caption
    assert summary.created == 3 + 6 + 3  # img0000 captions, new x 3 (both), img0002 images
    assert summary.reused == 20 * 6 - 6 - 3 - 3
    fresh = prep.prepare(experiment(src, tmp_path / "fresh", repeats=3), progress=False)
    assert fresh.total("files") == 60
    assert tree_hash(tmp_path / "prepared" / "art") == tree_hash(tmp_path / "fresh" / "art")


def test_interrupted_build_leaves_the_old_folder_and_a_rerun_finishes(tmp_path, monkeypatch):
    src = write_dataset(tmp_path / "src", 30)
    reference = tmp_path / "reference"
    prep.prepare(experiment(src, reference, repeats=4), progress=False)
    cfg = experiment(src, tmp_path / "prepared", repeats=4)
    calls = {"n": 0}
    place = prep.Linker.place

    def interrupted(self, s, d):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        place(self, s, d)

    monkeypatch.setattr(prep.Linker, "place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg, progress=False)
    assert not (tmp_path / "prepared" / "art").exists()  # no half-built folder under the real name
    monkeypatch.setattr(prep.Linker, "place", place)
    prep.prepare(cfg, progress=False)
    assert tree_hash(tmp_path / "prepared") == tree_hash(reference)


def test_interrupted_between_the_two_renames(tmp_path, monkeypatch):
    src = write_dataset(tmp_path / "src", 10)
    cfg = experiment(src, tmp_path / "prepared", repeats=2)
    prep.prepare(cfg, progress=False)
    (src / "img0003.txt").write_text("k4s4, style 0, changed, caption", encoding="utf-8")
    rename, calls = os.rename, {"n": 0}

    def second_fails(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        rename(a, b)

    monkeypatch.setattr(prep.os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg, progress=False)
    monkeypatch.setattr(prep.os, "rename", rename)
    assert not (tmp_path / "prepared" / "art").exists() and (tmp_path / "prepared" / ".art.old").is_dir()
    prep.prepare(cfg, progress=False)
    prep.prepare(experiment(src, tmp_path / "reference", repeats=2), progress=False)
    assert tree_hash(tmp_path / "prepared") == tree_hash(tmp_path / "reference")


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from sd3exp import prepare as prep
from tests.test_prepare import experiment
place, calls = prep.Linker.place, [0]
def slow(self, s, d):
    calls[0] += 1
    if calls[0] == 1000:
        Path(sys.argv[3]).write_text("midway")
        time.sleep(60)
    place(self, s, d)
prep.Linker.place = slow
prep.prepare(experiment(Path(sys.argv[1]), Path(sys.argv[2])), progress=False)
"""


def test_killed_process_then_rerun_equals_an_uninterrupted_run(big, tmp_path):
    base, src, cfg, _, before = big
    prepared, flag = tmp_path / "prepared", tmp_path / "midway"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(prepared), str(flag)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flag.exists() and (prepared / ".art.building").is_dir() and not (prepared / "art").exists()
    prep.prepare(experiment(src, prepared), progress=False)
    assert tree_hash(prepared) == tree_hash(base / "run" / "dataset")
    assert not (prepared / ".art.building").exists()
    assert source_state(src) == before


KILL_IN_MANIFEST_SCRIPT = """
import os, sys, time
from pathlib import Path
from sd3exp import io, prepare as prep
from tests.test_prepare import experiment
def stuck(fd):
    Path(sys.argv[3]).write_text("writing the manifest")
    time.sleep(60)
io.os.fsync = stuck
prep.prepare(experiment(Path(sys.argv[1]), Path(sys.argv[2]), repeats=2), progress=False)
"""


def test_a_kill_inside_the_manifest_write_leaves_no_temporary_file_after_the_rerun(tmp_path):
    """Issue 9 (found by test_faults): kill -9 between an atomic write's temporary file and its rename
    left `.sd3exp-prepare.json.*.tmp` for good; the next prepare removes what a dead writer left."""
    src, prepared, flag = write_dataset(tmp_path / "src", 3), tmp_path / "prepared", tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", KILL_IN_MANIFEST_SCRIPT, str(src), str(prepared), str(flag)],
                            cwd=ROOT)
    deadline = time.monotonic() + 30
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flag.exists() and len(list(prepared.glob(".*.tmp"))) == 1
    live = prepared / f".{prep.MANIFEST}.{os.getpid()}.abcd1234.tmp"  # a write under way in a live process
    live.write_text("{}")
    prep.prepare(experiment(src, prepared, repeats=2), progress=False)
    assert list(prepared.glob(".*.tmp")) == [live]
    prep.prepare(experiment(src, tmp_path / "reference", repeats=2), progress=False)
    live.unlink()
    assert tree_hash(prepared) == tree_hash(tmp_path / "reference")


def test_native_mode_links_each_image_once_with_its_caption(tmp_path):
    src = write_dataset(tmp_path / "src", 12)
    cfg = experiment(src, tmp_path / "prepared", repeats=10, mode="native")
    summary = prep.prepare(cfg, progress=False)
    out = tmp_path / "prepared" / "art"
    assert summary.total("files") == 12
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    assert all((out / p.name).stat().st_ino == p.stat().st_ino for p in src.glob("*.png"))
    rec = json.loads((tmp_path / "prepared" / prep.MANIFEST).read_text())["concepts"]["art"]
    assert rec["simpletuner_repeats"] == 9
    assert rec["caption_shuffle"] == {"enable": True, "count": 10, "seed": 42, "split_on": "comma",
                                      "position_start": 2, "include_original": False}


def test_falls_back_to_symlinks_then_to_reflink_or_copy(tmp_path, monkeypatch):
    src = write_dataset(tmp_path / "src", 5)

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(prep.os, "link", no_link)
    summary = prep.prepare(experiment(src, tmp_path / "a", repeats=2), progress=False)
    assert summary.concepts[0].link_modes == {"symlink": 10}
    assert os.readlink(tmp_path / "a" / "art" / "img0000_1.png") == str(src / "img0000.png")
    monkeypatch.setattr(prep.os, "symlink", no_link)
    summary = prep.prepare(experiment(src, tmp_path / "b", repeats=2), progress=False)
    modes = summary.concepts[0].link_modes
    assert sum(modes.values()) == 10 and set(modes) <= {"reflink", "copy"}
    assert (tmp_path / "b" / "art" / "img0004_2.png").read_bytes() == (src / "img0004.png").read_bytes()
    if "copy" in modes:
        assert summary.total("bytes_written") > 2 * sum(p.stat().st_size for p in src.glob("*.png"))
    assert "unchanged" in prep.prepare(experiment(src, tmp_path / "b", repeats=2), progress=False).line()


def test_missing_captions_stop_before_anything_is_written(tmp_path):
    src = write_dataset(tmp_path / "src", 6)
    (src / "img0002.txt").unlink()
    (src / "img0004.txt").unlink()
    before = source_state(src)
    with pytest.raises(DatasetError, match=r"2 image\(s\) without a caption file: img0002.png, img0004.png"):
        prep.prepare(experiment(src, tmp_path / "prepared"), progress=False)
    assert not (tmp_path / "prepared").exists() and source_state(src) == before
    summary = prep.prepare(experiment(src, tmp_path / "prepared", repeats=2, allow_missing=True), progress=False)
    assert summary.concepts[0].captions_from_trigger == ["img0002.png", "img0004.png"]
    assert (tmp_path / "prepared" / "art" / "img0002_1.txt").read_text() == "k4s4"


@pytest.mark.parametrize("where", ["inside", "same"])
def test_refuses_to_prepare_into_a_source_folder(tmp_path, where):
    src = write_dataset(tmp_path / "art", 3)
    prepared = src / "prepared" if where == "inside" else tmp_path
    with pytest.raises(ConfigError, match="dataset.prepared_dir"):
        prep.prepare(experiment(src, prepared), progress=False)
    assert sorted(p.name for p in src.iterdir()) == sorted(f"img000{i}.{e}" for i in range(3) for e in ("png", "txt"))


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    src = write_dataset(tmp_path / "src", 3)
    foreign = tmp_path / "prepared" / "art"
    foreign.mkdir(parents=True)
    (foreign / "precious.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not made by sd3exp"):
        prep.prepare(experiment(src, tmp_path / "prepared"), progress=False)
    assert (foreign / "precious.png").read_bytes() == b"x"


def test_missing_source_folder_and_shared_stems_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        prep.prepare(experiment(tmp_path / "nowhere", tmp_path / "prepared"), progress=False)
    src = write_dataset(tmp_path / "src", 2)
    Image.new("RGB", (8, 8)).save(src / "img0000.jpg")
    with pytest.raises(DatasetError, match="img0000.png, img0000.jpg|img0000.jpg, img0000.png"):
        prep.prepare(experiment(src, tmp_path / "prepared"), progress=False)


def test_shuffle_off_never_copies(tmp_path):
    src = write_dataset(tmp_path / "src", 4)
    summary = prep.prepare(experiment(src, tmp_path / "p", repeats=5, shuffle=False), progress=False)
    assert summary.total("files") == 4 and summary.concepts[0].mode == "native"


def test_one_layout_per_content_of_names_and_captions(tmp_path):
    """The cache key and prepare() share one layout; a caption edit of the same size still makes a new one."""
    src = write_dataset(tmp_path / "src", 3)
    concept = experiment(src, tmp_path / "prepared").concepts[0]
    first = prep.layout(concept, 42)
    assert prep.layout(concept, 42) is first
    caption = src / "img0001.txt"
    caption.write_text(caption.read_text().replace("k4s4", "k4s5"), encoding="utf-8")
    second = prep.layout(concept, 42)
    assert second is not first and b"k4s5" in second.files["img0001_1.txt"]
    assert prep.layout(concept, 7) is not second


def test_a_no_change_rerun_reads_no_prepared_file_but_notices_one_removed(tmp_path, monkeypatch):
    """Nothing changed since the last prepare (inputs, manifest, the folders' inode and mtime): no file
    in the prepared folder is read; a file removed there, or a caption edited in the source, is noticed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = write_dataset(tmp_path / "src", 5)
    cfg = experiment(src, tmp_path / "prepared", repeats=2)
    prep.prepare(cfg, progress=False)
    copy = tmp_path / "prepared" / "art" / "img0001_1.txt"
    text, stamp = copy.read_bytes(), copy.stat().st_mtime_ns
    copy.write_bytes(b"x" * len(text))
    os.utime(copy, ns=(stamp, stamp))  # other bytes in place: only a re-read would see them
    assert "unchanged" in prep.prepare(cfg, progress=False).line()
    copy.unlink()
    assert prep.prepare(cfg, progress=False).total("created") == 1 and copy.read_bytes() == text
    caption = src / "img0002.txt"
    caption.write_text(caption.read_text().replace("k4s4", "k4s5"), encoding="utf-8")  # same size
    assert prep.prepare(cfg, progress=False).total("created") == 2
    assert all(b"k4s5" in p.read_bytes() for p in (tmp_path / "prepared" / "art").glob("img0002_*.txt"))
