"""The shared text-embed/VAE cache: its key follows the data and settings, and one job fills it at a time."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

from sd3exp.cache import cache_dir, cache_key, filling
from sd3exp.demo_data import make_demo_dataset
from sd3exp.job import absolute_paths
from tests.helpers import compose_experiment


def demo(root: Path, *overrides: str):
    """The demo experiment with its dataset generated under `root`."""
    make_demo_dataset(root / "data" / "demo" / "shapes", "k4s4", {(64, 64): 4, (128, 64): 2}, 0)
    cfg = compose_experiment("demo", [f"paths.root_dir={root}", *overrides], run_dir=str(root / "outputs" / "run"))
    return absolute_paths(cfg)


def test_equal_data_in_two_clones_shares_a_key(tmp_path):
    a, b = demo(tmp_path / "a", "lora.rank=2"), demo(tmp_path / "b", "lora.rank=64", "optimizer.lr=1e-3")
    assert cache_key(a) == cache_key(b)
    assert cache_dir(a) == (tmp_path / "a" / "outputs" / "cache" / cache_key(a))


def test_other_images_captions_or_settings_get_other_keys(tmp_path):
    cfg = demo(tmp_path)
    keys = {cache_key(cfg)}
    for change in (["dataset.resolution=128"], ["dataset.crop=true"], ["model.flavour=medium"]):
        keys.add(cache_key(demo(tmp_path, *change)))
    folder = Path(cfg.concepts[0].path)
    caption = next(folder.glob("*.txt"))
    caption.write_text(caption.read_text() + ", edited")
    keys.add(cache_key(cfg))
    image = next(folder.glob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")
    keys.add(cache_key(cfg))
    assert len(keys) == 6


def test_a_dataset_not_on_disk_still_gets_a_key(tmp_path):
    cfg = demo(tmp_path)
    missing = dataclasses.replace(cfg, concepts=[dataclasses.replace(cfg.concepts[0], path=str(tmp_path / "nope"))])
    assert cache_key(missing) != cache_key(cfg)


def _fill(folder: str, hold_s: float, events) -> None:
    with filling(Path(folder)) as done:
        events.put(("in", time.monotonic()))
        time.sleep(hold_s)
        events.put(("released", time.monotonic()))
        done()
        time.sleep(hold_s)  # training on: the next job need not wait for this


def test_jobs_take_turns_filling_a_cache_until_the_first_step(tmp_path):
    events = multiprocessing.get_context("fork").Queue()
    jobs = [multiprocessing.get_context("fork").Process(target=_fill, args=(str(tmp_path / "c"), 1.0, events))
            for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(20)
    got = sorted((events.get(timeout=5) for _ in range(4)), key=lambda e: e[1])
    assert [kind for kind, _ in got] == ["in", "released", "in", "released"]
    assert got[2][1] - got[0][1] < 1.9  # the second got in when the first released, not when it ended


def test_an_image_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    """The key reads an image again only when its size or mtime changed, and then equals a fresh key."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = demo(tmp_path)
    key = cache_key(cfg)
    image = sorted(Path(cfg.concepts[0].path).glob("*.png"))[0]
    stamp, data = image.stat().st_mtime_ns, bytearray(image.read_bytes())
    data[-1] ^= 1
    image.write_bytes(data)
    os.utime(image, ns=(stamp, stamp))  # other bytes behind the old size and mtime: only a re-read sees them
    assert cache_key(cfg) == key
    os.utime(image, ns=(stamp + 10**9, stamp + 10**9))
    changed = cache_key(cfg)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    assert changed != key and cache_key(cfg) == changed
