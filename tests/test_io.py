"""Durable writes: an evaluation's images are on the disk (fsynced) before cells.json names them, also
where they were written unsynced and synced while the grid was drawn (sd3exp.io.synced)."""

from __future__ import annotations

import itertools
import json
import os
import stat
import time
from pathlib import Path

import pytest

from sd3exp import io
from sd3exp.evaluate.stage import evaluate
from sd3exp.io import background, stale_temporary, synced, write_bytes
from tests.comfy_standin import StandIn
from tests.helpers import compose_experiment
from tests.test_eval_cli import fake_lora_run


def test_synced_runs_the_block_then_raises_the_first_error(tmp_path):
    ran = []
    with pytest.raises(FileNotFoundError):
        with synced([tmp_path / "missing.png"]):
            ran.append(True)
    assert ran == [True]


def test_background_work_is_finished_when_the_block_ends_and_its_error_raised():
    done = []
    with pytest.raises(ZeroDivisionError):
        with background(2, "test") as submit:
            submit(time.sleep, 0.2)
            submit(lambda: done.append(1) or 1 / 0)
            submit(lambda: time.sleep(0.1) or done.append(2))
    assert sorted(done) == [1, 2]


def test_the_blocks_own_error_wins_over_the_backgrounds():
    with pytest.raises(KeyError):
        with background(1, "test") as submit:
            submit(lambda: 1 / 0)
            raise KeyError("the block's")


def test_an_unsynced_write_leaves_the_same_file_as_a_synced_one(tmp_path):
    write_bytes(tmp_path / "a.png", b"\x89PNG data")
    write_bytes(tmp_path / "b.png", b"\x89PNG data", sync=False)
    a, b = (tmp_path / "a.png").stat(), (tmp_path / "b.png").stat()
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG data"
    assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left


def test_a_write_makes_its_folder_and_gives_the_file_the_permissions_the_umask_allows(tmp_path):
    before = os.umask(0o027)
    try:
        write_bytes(tmp_path / "new" / "sub" / "a.png", b"data", sync=False)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "new" / "sub" / "a.png").stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "new" / "sub") == ["a.png"]


def test_a_temporary_file_a_killed_writer_left_under_the_same_name_is_left_alone(tmp_path, monkeypatch):
    """A process that had this pid before was killed mid-write: its temporary files keep their bytes
    (remove_stale_temporaries' to judge), the write takes the next free name."""
    monkeypatch.setattr(io, "_TEMPORARY_NUMBERS", itertools.count())
    left = [tmp_path / f".a.png.{os.getpid()}.{n:x}.tmp" for n in range(2)]
    for n, path in enumerate(left):
        path.write_bytes(f"half {n}".encode())
    write_bytes(tmp_path / "a.png", b"whole")
    assert (tmp_path / "a.png").read_bytes() == b"whole"
    assert [p.read_bytes() for p in left] == [b"half 0", b"half 1"] and not stale_temporary(left[0])  # ours: alive
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in left] + ["a.png"])


def test_a_folder_another_writer_makes_at_the_same_moment_is_written_into(tmp_path, monkeypatch):
    """Two writers into a missing folder (caption threads into a new cache folder): the other makes it between
    this one's failed open and its look at the folder."""
    folder, real_open = tmp_path / "new", os.open

    def racing_open(path, *args, **kwargs):
        if not folder.exists():
            folder.mkdir()  # the other writer, just after this open found the folder missing
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    write_bytes(folder / "a.json", b"{}")
    assert (folder / "a.json").read_bytes() == b"{}"


def test_every_image_cells_json_names_was_fsynced_before_cells_json_was_written(tmp_path, monkeypatch):
    """os.fsync spied on (the standard library's, not sd3exp's): each call records the file it flushed."""
    flushed, order = set(), []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        flushed.add((path.stat().st_dev, path.stat().st_ino))
        order.append(path.name)

    monkeypatch.setattr(os, "fsync", spy)
    run, models = tmp_path / "run", tmp_path / "models"
    fake_lora_run(run, steps=(2, 4))
    with StandIn(tmp_path / "comfy", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 delay_s=0.0) as server:
        cfg = compose_experiment("demo_lora", [
            "demo=false", "concepts.0.num_images=16", "eval.backend=comfyui", f"eval.url={server.url}",
            f"eval.models_dir={models}", "eval.include_final=false", "eval.include_base=false",
            "eval.scoring.enabled=false", "tracking.mlflow.enabled=false", "eval.seeds=[1,2]"], str(run))
        evaluate(cfg, run)
    cells_json = run / "eval" / "cells.json"
    named = [run / "eval" / p for cell in json.loads(cells_json.read_text()) for p in cell["paths"]]
    assert len(named) == 2 * 2 * len(cfg.eval.prompts)
    assert all((p.stat().st_dev, p.stat().st_ino) in flushed for p in named)
    written = [n for n in order if n.startswith(".cells.json.")]
    assert written and all(order.index(p.name) < order.index(written[0]) for p in named)
