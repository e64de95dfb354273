"""The caption audit: every kind of bad input is reported, and the source folder is left as it was."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from sd3exp import audit as aud
from sd3exp.buckets import BucketRule
from sd3exp.images import readable_sizes
from sd3exp.schema import ExperimentConfig
from tests.test_prepare import experiment, source_state, write_dataset


def messy_experiment(src: Path, prepared: Path, **captions) -> ExperimentConfig:
    """At resolution 128 (pixel_area) only small.png is upscaled."""
    cfg = experiment(src, prepared, **captions)
    return replace(cfg, dataset=replace(cfg.dataset, resolution=128))


def png(size=(16, 16), colour=(0, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path) -> Path:
    """Six good images, then one of each problem the audit knows."""
    src = write_dataset(tmp_path / "src", 6, size=(512, 256))
    big = (src / "img0000.png").read_bytes()
    files = {
        "nocap.png": big,
        "orphan.txt": "k4s4, no image",
        "empty.png": png((256, 256), (1, 0, 0)), "empty.txt": "  \n",
        "notrig.png": png((256, 256), (2, 0, 0)), "notrig.txt": "a woman, red hair",
        "late.png": png((256, 256), (3, 0, 0)), "late.txt": "a woman, k4s4, red hair",
        "trunc.png": png((256, 256), (4, 0, 0))[:60], "trunc.txt": "k4s4, cut off",
        "garbage.jpg": b"not a jpeg at all", "garbage.txt": "k4s4, garbage",
        "small.png": png((64, 32), (5, 0, 0)), "small.txt": "k4s4, style 1, small",
        "dup.png": big, "dup.txt": "k4s4, style 0, again",
        "long.png": png((256, 256), (6, 0, 0)), "long.txt": "k4s4, " + " ".join(["word"] * 80),
        "few.png": png((256, 256), (7, 0, 0)), "few.txt": "k4s4",
        "lines.png": png((256, 256), (8, 0, 0)), "lines.txt": "k4s4, one\nk4s4, two",
        "kohya.png": png((256, 256), (9, 0, 0)), "kohya.txt": "k4s4 ||| a, b",
        "latin1.png": png((256, 256), (10, 0, 0)), "latin1.txt": "k4s4, caf\xe9".encode("latin-1"),
        "twin.png": png((256, 256), (11, 0, 0)), "twin.jpg": b"x", "twin.txt": "k4s4, twins",
        "notes.md": "hello",
    }
    for name, data in files.items():
        (src / name).write_bytes(data.encode() if isinstance(data, str) else data)
    (src / "sub").mkdir()
    return src


def test_every_problem_is_reported_and_the_source_is_untouched(messy, tmp_path):
    before = source_state(messy)
    cfg = messy_experiment(messy, tmp_path / "prepared", keep_tags=2)
    report = aud.audit(cfg)
    a = report.concepts[0]
    assert a.missing_captions == ["nocap.png"]
    assert a.orphan_captions == ["orphan.txt"]
    assert a.empty_captions == ["empty.txt"]
    assert a.undecodable_captions == ["latin1.txt"]
    assert a.lacking_trigger == ["notrig.txt"]
    assert a.trigger_not_first == ["late.txt"]
    assert sorted(a.unreadable) == ["garbage.jpg", "trunc.png", "twin.jpg"]
    assert list(a.too_small) == ["small.png"]
    assert a.duplicates == [["dup.png", "img0000.png", "nocap.png"]]
    assert list(a.long_captions) == ["long.txt"] and a.long_captions["long.txt"] == 82
    assert a.too_few_tags == {"few.txt": 1}
    assert a.multiline == ["lines.txt"] and a.keep_separator == ["kohya.txt"]
    assert a.shared_stems == ["twin.jpg, twin.png"]
    assert a.ignored_files == ["notes.md", "sub/"]
    assert a.tag_counts["k4s4"] == 16 and a.tag_counts["style 0"] == 3
    assert len(a.sizes) == len(a.images) - 3 and (512, 256) in a.sizes and (64, 32) in a.sizes
    assert source_state(messy) == before and not (tmp_path / "prepared").exists()


def test_errors_follow_the_experiment_policy(messy, tmp_path):
    cfg = messy_experiment(messy, tmp_path / "prepared", keep_tags=2)
    errors = aud.audit_errors(aud.audit(cfg), cfg)
    text = "\n".join(errors)
    for what in ("without a caption file: nocap.png", "without an image: orphan.txt", "empty caption(s): empty.txt",
                 "not UTF-8: latin1.txt", "unreadable", "sharing one caption file", "without the trigger word",
                 "fewer tags than keep_tags=2: few.txt"):
        assert what in text
    for warning in ("upscaled", "identical", "CLIP", "multi-line", "|||", "not starting with"):
        assert warning not in text
    lenient = replace(cfg, concepts=[replace(cfg.concepts[0], captions=replace(
        cfg.concepts[0].captions, allow_missing=True, require_trigger=False, shuffle=False))])
    report = aud.audit(lenient)
    remaining = "\n".join(report.errors)
    assert "nocap" not in remaining and "orphan" not in remaining and "trigger" not in remaining
    assert "keep_tags" not in remaining and "unreadable" in remaining
    assert any("nocap.png" in w for w in report.warnings)


def test_missing_folder_is_reported_not_raised(tmp_path):
    cfg = experiment(tmp_path / "nowhere", tmp_path / "prepared")
    report = aud.audit(cfg)
    assert not report.concepts[0].found and not report.concepts[0].sizes
    assert report.errors == [f"concept 'art': folder {tmp_path / 'nowhere'} not found. "
                             "Fix: point concepts[].path at it"]
    assert not (tmp_path / "nowhere").exists()


def test_clean_folder_has_no_errors_and_gives_the_planner_its_sizes(tmp_path):
    src = write_dataset(tmp_path / "src", 5, size=(1344, 768))
    Image.new("RGB", (768, 1344)).save(src / "tall.png")
    (src / "tall.txt").write_text("k4s4, tall")
    report = aud.audit(experiment(src, tmp_path / "p"))
    assert report.errors == [] and report.warnings == []
    assert list(report.concepts[0].sizes) == [(1344, 768)] * 5 + [(768, 1344)]


def test_write_audit_is_json_and_summarises(messy, tmp_path):
    cfg = messy_experiment(messy, tmp_path / "prepared", keep_tags=2)
    report = aud.audit(cfg)
    path = tmp_path / "run" / "audit.json"
    summary = aud.write_audit(report, path)
    data = json.loads(path.read_text())
    assert data["concepts"][0]["missing_captions"] == ["nocap.png"] and data["errors"] == report.errors
    assert summary.splitlines()[0] == (f"audit: 1 concept(s), {len(report.concepts[0].images)} images, "
                                       f"{len(report.errors)} error(s), {len(report.warnings)} warning(s) -> {path}")
    assert "top tags of 'art': k4s4 (16)" in summary
    assert [p.name for p in path.parent.iterdir()] == ["audit.json"]


@pytest.mark.parametrize("kind, resolution, size, small", [
    ("pixel", 1024, (2048, 1000), True), ("pixel", 1024, (1024, 4096), False),
    ("pixel_area", 1024, (1344, 768), False), ("pixel_area", 1024, (1000, 1000), True),
    ("area", 1.0, (1024, 1024), False), ("area", 1.0, (1000, 1000), True),
])
def test_upscaled_compares_with_simpletuners_target_size(kind, resolution, size, small):
    assert aud.upscaled(size, BucketRule(resolution, kind)) is small


def test_token_estimate_counts_words_and_punctuation():
    assert aud.estimate_clip_tokens("k4s4, a red-haired woman.") == 8
    assert aud.estimate_clip_tokens("") == 0


@pytest.mark.parametrize("mode", ["native", "materialized"])
def test_a_caption_with_a_byte_order_mark_starts_with_its_trigger_and_is_prepared_without_it(tmp_path, mode):
    from sd3exp import prepare as prep

    src = write_dataset(tmp_path / "src", 3)
    caption = src / "img0001.txt"
    caption.write_bytes(b"\xef\xbb\xbf" + caption.read_bytes())
    cfg = experiment(src, tmp_path / "p", repeats=2, mode=mode)
    report = aud.audit(cfg)
    assert report.concepts[0].lacking_trigger == [] and report.concepts[0].trigger_not_first == []
    files = prep.layout(cfg.concepts[0], cfg.seed).files
    texts = [data for name, data in files.items() if name.startswith("img0001") and name.endswith(".txt")]
    assert texts and all(data.startswith(b"k4s4") for data in texts)


def test_a_gif_is_named_as_a_format_not_trained_and_a_subfolder_of_images_is_refused(tmp_path):
    src = write_dataset(tmp_path / "src", 3)
    Image.new("RGB", (16, 16)).save(src / "moving.gif")
    (src / "moving.txt").write_text("k4s4, moving")
    write_dataset(src / "more", 2)
    report = aud.audit(experiment(src, tmp_path / "p"))
    a = report.concepts[0]
    assert a.orphan_captions == [] and a.ignored_files == []
    assert a.other_formats == ["moving.gif"] and a.image_subfolders == ["more/"]
    assert any("1 subfolder(s) with images: SimpleTuner 4.10.1 reads subfolders" in e and "more/" in e
               for e in report.errors)
    assert any("image(s) in a format sd3exp does not train on" in w and "moving.gif" in w for w in report.warnings)


def restamp(path: Path, data: bytes, mtime_ns: int) -> None:
    """Give `path` other bytes of the same size, with the mtime `mtime_ns`."""
    assert len(data) == path.stat().st_size
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_an_unchanged_image_is_not_read_again_and_a_changed_one_is(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = write_dataset(tmp_path / "src", 4)
    before = source_state(src)
    cfg = experiment(src, tmp_path / "prepared")
    first = aud.audit(cfg)
    image, twin = src / "img0001.png", (src / "img0000.png").read_bytes()
    stamp, original = image.stat().st_mtime_ns, image.read_bytes()
    restamp(image, b"\0" * len(twin), stamp)  # garbage behind the old size and mtime: only a re-read sees it
    assert aud.audit(cfg) == first
    restamp(image, twin, stamp + 10**9)  # same size, new mtime: hashed and decoded again
    again = aud.audit(cfg).concepts[0]
    assert again.duplicates == [["img0000.png", "img0001.png"]] and not again.unreadable
    restamp(image, b"\0" * len(twin), stamp + 2 * 10**9)
    assert list(aud.audit(cfg).concepts[0].unreadable) == ["img0001.png"]
    restamp(image, original, stamp)
    assert source_state(src) == before and list((tmp_path / "xdg" / "sd3exp" / "sources").glob("*.json"))


def test_image_sizes_are_read_once_per_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = write_dataset(tmp_path / "src", 2)
    assert readable_sizes(src) == ([(16, 16), (16, 16)], {})
    image = src / "img0001.png"
    stamp, garbage = image.stat().st_mtime_ns, b"\0" * image.stat().st_size
    restamp(image, garbage, stamp)
    assert readable_sizes(src) == ([(16, 16), (16, 16)], {})
    restamp(image, garbage, stamp + 10**9)
    sizes, unreadable = readable_sizes(src)
    assert sizes == [(16, 16)] and list(unreadable) == ["img0001.png"]
