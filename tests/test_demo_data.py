"""The demo dataset: deterministic bytes, declared sizes, trigger-first captions, safe reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sd3exp.demo import DEMO_COUNTS, ensure_demo_assets
from sd3exp.demo_data import MANIFEST, make_demo_dataset
from sd3exp.errors import ConfigError, RunConflictError
from sd3exp.job import absolute_paths
from tests.helpers import compose_experiment

COUNTS = {(64, 64): 3, (96, 64): 2, (64, 96): 2}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_arguments_give_the_same_bytes(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", "k4s4", COUNTS, seed=3)
    b = make_demo_dataset(tmp_path / "b", "k4s4", COUNTS, seed=3)
    assert snapshot(a) == snapshot(b)
    c = make_demo_dataset(tmp_path / "c", "k4s4", COUNTS, seed=4)
    assert snapshot(c) != snapshot(a)


def test_images_have_the_declared_sizes(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    sizes: dict[tuple[int, int], int] = {}
    for png in folder.glob("*.png"):
        with Image.open(png) as img:
            assert img.mode == "RGB"
            sizes[img.size] = sizes.get(img.size, 0) + 1
    assert sizes == COUNTS


def test_captions_start_with_the_trigger(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert [p.stem for p in pngs] == [t.stem for t in txts]
    for txt in txts:
        tags = txt.read_text(encoding="utf-8").split(", ")
        assert tags[0] == "k4s4" and tags[-1] == "simple shapes" and len(tags) == 4
        assert tags[2].endswith(" background")


def test_manifest_is_neither_image_nor_caption(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    assert (folder / MANIFEST).suffix not in {".png", ".txt", ".jpg"}
    assert len(list(folder.iterdir())) == 2 * sum(COUNTS.values()) + 1
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


def test_reuses_its_own_folder_even_with_trainer_files(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    (folder / "aspect_ratio_bucket_indices_demo.json").write_text("{}")
    before = snapshot(folder)
    assert make_demo_dataset(folder, "k4s4", COUNTS, seed=0) == folder
    assert snapshot(folder) == before


def test_uses_an_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    folder = make_demo_dataset(tmp_path / "d", "k4s4", {(64, 64): 1}, seed=0)
    assert len(list(folder.glob("*.png"))) == 1


@pytest.mark.parametrize("seed, trigger", [(1, "k4s4"), (0, "other")])
def test_refuses_a_demo_folder_made_with_other_parameters(tmp_path: Path, seed: int, trigger: str) -> None:
    folder = make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    with pytest.raises(RunConflictError):
        make_demo_dataset(folder, trigger, COUNTS, seed=seed)


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(RunConflictError):
        make_demo_dataset(tmp_path / "d", "k4s4", COUNTS, seed=0)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["mine.png"]


@pytest.mark.parametrize("trigger, counts", [("", COUNTS), ("a, b", COUNTS), ("k4s4", {(64, 64): 0})])
def test_rejects_bad_arguments(tmp_path: Path, trigger: str, counts: dict) -> None:
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path / "d", trigger, counts, seed=0)


OLD_DEMO = {(64, 64): 8, (64, 128): 4, (128, 64): 4}  # the 16 images of the demo before the learning demo


def demo_in(root: Path, *overrides: str):
    cfg = compose_experiment("demo", [f"paths.root_dir={root}", *overrides], run_dir=str(root / "outputs" / "run"))
    return absolute_paths(cfg)


def test_an_older_demos_dataset_is_set_aside_and_generated_anew(tmp_path: Path) -> None:
    """An upgrade: the project's data/demo/shapes holds the old demo's 16 images; the demo must not train on them."""
    old = make_demo_dataset(tmp_path / "data" / "demo" / "shapes", "k4s4", OLD_DEMO, seed=42)
    before = snapshot(old)
    ensure_demo_assets(demo_in(tmp_path), with_model=False)
    assert snapshot(tmp_path / "data" / "demo" / "shapes.previous-1") == before
    assert len(list(old.glob("*.png"))) == sum(DEMO_COUNTS.values())
    again = snapshot(old)
    ensure_demo_assets(demo_in(tmp_path, "seed=7"), with_model=False)  # a seed sweep shares the dataset
    assert snapshot(old) == again and not (tmp_path / "data" / "demo" / "shapes.previous-2").exists()


def test_an_older_demo_dataset_outside_the_projects_demo_folder_is_left_alone(tmp_path: Path) -> None:
    mine = make_demo_dataset(tmp_path / "mine", "k4s4", OLD_DEMO, seed=42)
    before = snapshot(mine)
    ensure_demo_assets(demo_in(tmp_path / "project", f"concepts.0.path={mine}"), with_model=False)
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
