"""Weight-free measures on constructed images with known answers, and scoring only new cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sd3exp.evaluate.cells import BASE_LABEL, Cell
from sd3exp.evaluate.score import choose_best, drift, pixel_fidelity, score_cells, thumbnail
from tests.helpers import compose_experiment


def shape(path: Path, background: tuple, colour: tuple, box: tuple = (16, 16, 48, 48), size: int = 64) -> Path:
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    img.save(path)
    return path


@pytest.fixture
def concept(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    shape(folder / "a.png", (0, 0, 255), (255, 0, 0))
    shape(folder / "b.png", (0, 0, 0), (255, 255, 0), box=(8, 8, 40, 56))
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text("k4s4, a shape")
    return folder


def test_the_training_image_itself_has_perfect_fidelity_and_flat_grey_less(concept, tmp_path):
    training = np.stack([thumbnail(p, 32) for p in sorted(concept.glob("*.png"))])
    itself = pixel_fidelity(thumbnail(concept / "a.png", 32), training)
    near = pixel_fidelity(thumbnail(shape(tmp_path / "near.png", (0, 0, 230), (230, 0, 0), (18, 18, 50, 50)), 32),
                          training)
    grey = pixel_fidelity(thumbnail(Image_bytes((128, 128, 128)), 32), training)
    assert itself == pytest.approx(100.0)
    assert itself > near > grey
    assert 0.0 <= grey < 75.0


def Image_bytes(colour: tuple, size: int = 64) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_drift_is_zero_for_the_base_render_and_grows_with_the_difference():
    base = thumbnail(Image_bytes((0, 0, 0)), 16)
    assert drift(base, base) == 0.0
    assert drift(thumbnail(Image_bytes((255, 255, 255)), 16), base) == pytest.approx(100.0)
    assert drift(thumbnail(Image_bytes((51, 51, 51)), 16), base) == pytest.approx(20.0)


def cells_on_disk(concept: Path, tmp_path: Path) -> list[Cell]:
    grey = tmp_path / "grey.png"
    grey.write_bytes(Image_bytes((128, 128, 128)))
    prompt = "k4s4, red circle"
    return [
        Cell(BASE_LABEL, None, 0, prompt, 0, "ok", paths=[grey]),
        Cell("checkpoint-2", 2, 0, prompt, 0, "ok", paths=[grey]),
        Cell("checkpoint-4", 4, 0, prompt, 0, "ok", paths=[concept / "a.png"]),
        Cell("checkpoint-6", 6, 0, prompt, 0, "error", error="CUDA out of memory"),
    ]


def test_score_cells_scores_ok_cells_once_and_leaves_failed_ones_out(concept, tmp_path):
    cfg = compose_experiment("demo", [f"concepts.0.path={concept}", "demo=false"])
    cells = cells_on_disk(concept, tmp_path)
    scored, fresh, kept = score_cells(cfg, cells)
    assert (fresh, kept) == (3, 0)
    by = {c.label: c for c in scored}
    assert by[BASE_LABEL].scores["drift"] == 0.0 and by["checkpoint-2"].scores["drift"] == 0.0
    assert by["checkpoint-4"].scores["pixel_fidelity"] == pytest.approx(100.0)
    assert by["checkpoint-4"].memorised is True and by["checkpoint-2"].memorised is False
    assert by["checkpoint-2"].scores["pixel_fidelity"] < by["checkpoint-4"].scores["pixel_fidelity"]
    assert by["checkpoint-6"].scores == {} and by["checkpoint-6"].memorised is None

    again, fresh, kept = score_cells(cfg, scored)
    assert (fresh, kept) == (0, 3) and again == scored

    shape(concept / "c.png", (128, 128, 128), (128, 128, 128))  # a new training image: flat grey
    rescored, fresh, _ = score_cells(cfg, scored)
    assert fresh == 3
    assert {c.label: c for c in rescored}["checkpoint-2"].scores["pixel_fidelity"] == pytest.approx(100.0)


def test_an_unreadable_image_is_left_out_of_the_scores(concept, tmp_path):
    cfg = compose_experiment("demo", [f"concepts.0.path={concept}", "demo=false"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cell = Cell("checkpoint-2", 2, 0, "k4s4, a", 0, "ok", paths=[broken])
    (out,), fresh, _ = score_cells(cfg, [cell])
    assert out.scores == {} and out.scored_with == ""


def test_a_prompt_is_scored_against_the_concept_its_trigger_names(concept, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shape(other / "x.png", (255, 255, 255), (0, 255, 0))
    cfg = compose_experiment("two_concepts", [f"concepts.0.path={concept}", "concepts.0.trigger=k4s4",
                                              f"concepts.1.path={other}", "concepts.1.trigger=zq9", "demo=false"])
    cells = [Cell("checkpoint-2", 2, 0, "zq9, a green dot", 0, "ok", paths=[concept / "a.png"]),
             Cell("checkpoint-2", 2, 1, "k4s4, a red dot", 0, "ok", paths=[concept / "a.png"])]
    (zq9, k4s4), _, _ = score_cells(cfg, cells)
    assert k4s4.scores["pixel_fidelity"] == pytest.approx(100.0)
    assert zq9.scores["pixel_fidelity"] < 90.0


def test_scores_png_is_drawn_only_when_a_cell_has_a_score(concept, tmp_path):
    cfg = compose_experiment("demo", [f"concepts.0.path={concept}", "demo=false"])
    failed = [c for c in cells_on_disk(concept, tmp_path) if c.status != "ok"]
    choose_best(cfg, tmp_path / "run", failed, {}, out_dir=tmp_path / "failed")
    assert (tmp_path / "failed" / "best.json").is_file() and not (tmp_path / "failed" / "scores.png").exists()
    choose_best(cfg, tmp_path / "run", cells_on_disk(concept, tmp_path), {}, out_dir=tmp_path / "scored")
    assert (tmp_path / "scored" / "scores.png").read_bytes()[:4] == b"\x89PNG"
