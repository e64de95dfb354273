"""Checkpoint discovery and ComfyUI model links on temporary folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import FULL_FILE, LORA_FILE, discover, select_steps
from sd3exp.evaluate.links import (
    comfy_name,
    extra_paths_yaml,
    link_checkpoints,
    write_extra_paths,
)


def touch(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def full_run(out: Path, steps=(100, 200, 1000), final: bool = True) -> Path:
    for step in steps:
        touch(out / f"checkpoint-{step}" / FULL_FILE, f"w{step}".encode())
    if final:
        touch(out / "pipeline" / FULL_FILE)
    return out


def test_full_layout_sorted_by_step_with_final_last(tmp_path: Path) -> None:
    found = discover(full_run(tmp_path))
    assert [(c.step, c.label, c.kind) for c in found.checkpoints] == [
        (100, "checkpoint-100", "full"), (200, "checkpoint-200", "full"),
        (1000, "checkpoint-1000", "full"), (None, "final", "full"),
    ]
    assert found.checkpoints[2].path == tmp_path / "checkpoint-1000" / FULL_FILE and found.problems == []


def test_lora_layout(tmp_path: Path) -> None:
    for step in (50, 25):
        touch(tmp_path / f"checkpoint-{step}" / LORA_FILE)
    touch(tmp_path / LORA_FILE)
    found = discover(tmp_path)
    assert [(c.label, c.kind) for c in found.checkpoints] == [
        ("checkpoint-25", "lora"), ("checkpoint-50", "lora"), ("final", "lora")
    ]
    assert found.checkpoints[-1].path == tmp_path / LORA_FILE


def test_incomplete_checkpoints_are_problems_not_silent_drops(tmp_path: Path) -> None:
    full_run(tmp_path, steps=(100,), final=False)
    touch(tmp_path / "checkpoint-200-tmp" / FULL_FILE)
    (tmp_path / "checkpoint-300" / "transformer").mkdir(parents=True)
    touch(tmp_path / "checkpoint-400" / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    found = discover(tmp_path)
    assert [c.label for c in found.checkpoints] == ["checkpoint-100"]
    text = "\n".join(found.problems)
    assert "checkpoint-200-tmp: unfinished save" in text
    assert "checkpoint-300: no transformer/diffusion_pytorch_model.safetensors" in text
    assert "checkpoint-400: sharded" in text and "no final model" in text
    assert len(found.problems) == 4


def test_filters_and_missing_folder(tmp_path: Path) -> None:
    full_run(tmp_path, steps=(100, 200, 300, 400, 500))
    found = discover(tmp_path, every_k=2, min_step=200, max_step=500, include_final=False)
    assert [c.step for c in found.checkpoints] == [200, 400]
    with pytest.raises(EvalError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(EvalError, match="every_k"):
        select_steps([1], every_k=0)


@given(st.sets(st.integers(0, 10_000)), st.integers(1, 5), st.integers(0, 10_000), st.integers(0, 10_000))
def test_select_steps_properties(steps: set, k: int, lo: int, hi: int) -> None:
    kept = select_steps(sorted(steps, reverse=True), k, lo, hi)
    in_range = sorted(s for s in steps if lo <= s <= hi)
    assert kept == sorted(kept) and set(kept) <= set(in_range)
    assert len(kept) == (len(in_range) + k - 1) // k and (not in_range or kept[0] == in_range[0])


def test_links_created_then_identical_ones_skipped(tmp_path: Path) -> None:
    found = discover(full_run(tmp_path / "out"))
    models = tmp_path / "models"
    first = link_checkpoints(found.checkpoints, models, "run1")
    assert [a.action for a in first] == ["create"] * 4
    name = comfy_name(found.checkpoints[1], "run1", "symlink", tmp_path / "out")
    assert re.fullmatch(r"run1/checkpoint-200-[0-9a-f]{10}\.safetensors", name)
    link = models / "unet" / name
    assert link.is_symlink() and link.read_bytes() == b"w200"
    again = link_checkpoints(found.checkpoints, models, "run1")
    assert [a.action for a in again] == ["skip"] * 4 and not any(a.problem for a in again)


def test_lora_links_go_to_loras(tmp_path: Path) -> None:
    touch(tmp_path / "out" / "checkpoint-5" / LORA_FILE)
    found = discover(tmp_path / "out", include_final=False)
    link_checkpoints(found.checkpoints, tmp_path / "models", "r")
    assert [p.is_symlink() for p in (tmp_path / "models" / "loras" / "r").glob("checkpoint-5-*.safetensors")] == [True]


def test_a_different_file_is_never_overwritten(tmp_path: Path) -> None:
    found = discover(full_run(tmp_path / "out", steps=(100,)), include_final=False)
    name = comfy_name(found.checkpoints[0], "run1", "symlink", tmp_path / "out")
    other = touch(tmp_path / "models" / "unet" / name, b"someone else's")
    actions = link_checkpoints(found.checkpoints, tmp_path / "models", "run1")
    assert [a.action for a in actions] == ["conflict"] and "not overwritten" in actions[0].message
    assert not other.is_symlink() and other.read_bytes() == b"someone else's"


def test_broken_links_are_reported(tmp_path: Path) -> None:
    found = discover(full_run(tmp_path / "out", steps=(100,)), include_final=False)
    folder = tmp_path / "models" / "unet" / "run1"
    folder.mkdir(parents=True)
    name = comfy_name(found.checkpoints[0], "run1", "symlink", tmp_path / "out").split("/")[1]
    (folder / name).symlink_to(tmp_path / "gone" / "a.safetensors")
    (folder / "checkpoint-50.safetensors").symlink_to(tmp_path / "gone" / "b.safetensors")
    actions = link_checkpoints(found.checkpoints, tmp_path / "models", "run1")
    assert [(a.action, a.link.name) for a in actions] == [("broken", name), ("broken", "checkpoint-50.safetensors")]
    assert os.readlink(folder / name) == str(tmp_path / "gone" / "a.safetensors")


def test_a_changed_checkpoint_gets_a_new_link_name_and_the_old_link_goes(tmp_path: Path) -> None:
    """ComfyUI caches a loader by its input values: a retrained file under the old name is not reloaded."""
    found = discover(full_run(tmp_path / "out", steps=(100,)), include_final=False)
    models = tmp_path / "models"
    link_checkpoints(found.checkpoints, models, "run1")
    before = comfy_name(found.checkpoints[0], "run1", "symlink", tmp_path / "out")
    weights = found.checkpoints[0].path
    weights.write_bytes(b"retrained")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    actions = link_checkpoints(found.checkpoints, models, "run1")
    after = comfy_name(found.checkpoints[0], "run1", "symlink", tmp_path / "out")
    assert after != before and [a.action for a in actions] == ["create", "remove"]
    assert sorted(p.name for p in (models / "unet" / "run1").iterdir()) == [after.split("/")[1]]


def test_extra_model_paths_instead_of_links(tmp_path: Path) -> None:
    out = full_run(tmp_path / "out", steps=(100,))
    found = discover(out)
    text = extra_paths_yaml("run1", out, [c.kind for c in found.checkpoints])
    assert text == f'"sd3exp_run1":\n  base_path: "{out.resolve()}"\n  diffusion_models: .\n'
    assert comfy_name(found.checkpoints[0], "run1", "extra_paths", out) == f"checkpoint-100/{FULL_FILE.as_posix()}"
    target = tmp_path / "extra_model_paths.yaml"
    assert write_extra_paths(target, text) and not write_extra_paths(target, text)
    with pytest.raises(EvalError, match="not overwritten"):
        write_extra_paths(target, text.replace("run1", "run2"))
    assert not (tmp_path / "models").exists()
