"""Scoring defects of issue 21 item 3, each checked without a trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd3exp.evaluate import models
from sd3exp.evaluate.score import scoring_key
from sd3exp.layout import RunLayout
from tests.helpers import compose_experiment


def fine_tune(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_two_fine_tunes_of_one_architecture_have_different_digests_and_scoring_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    one, two = fine_tune(tmp_path / "one", b"\x01" * 64), fine_tune(tmp_path / "two", b"\x02" * 64)
    assert models.model_digest(one) != models.model_digest(two)
    cfg = compose_experiment("demo", ["demo=false", f"concepts.0.path={tmp_path / 'none'}"])
    assert scoring_key(cfg, {}, {"clip": one}) != scoring_key(cfg, {}, {"clip": two})
    same = fine_tune(tmp_path / "same", b"\x01" * 64)
    assert models.model_digest(same) == models.model_digest(one)  # content, not place


def test_a_model_rewritten_in_place_gets_a_new_digest_and_an_unchanged_one_is_not_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = fine_tune(tmp_path / "model", b"\x01" * 64)
    before = models.model_digest(model)
    cache = json.loads((tmp_path / "xdg" / "sd3exp" / "file-hashes.json").read_text())
    assert str((model / "model.safetensors").resolve()) in cache
    (model / "model.safetensors").write_bytes(b"\x03" * 64)  # same size
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert models.model_digest(model) != before
    assert models.model_digest(model) == models.model_digest(fine_tune(tmp_path / "copy", b"\x03" * 64))


def test_the_report_and_the_rule_show_enough_digits_to_tell_the_chosen_checkpoint_from_the_others(tmp_path):
    import re

    from sd3exp.evaluate.report import render_report, report_context
    from sd3exp.evaluate.score import best_record
    from sd3exp.evaluate.select import Candidate, choose, make_rule
    from sd3exp.io import write_json
    from sd3exp.layout import EvalLayout

    values = {"checkpoint-2": 70.31234, "checkpoint-4": 70.31012, "checkpoint-6": 70.30998, "checkpoint-8": 70.3141}
    candidates = [Candidate(label, int(label.split("-")[1]), {"clip_t": v, "pixel_fidelity": v}, 4, 0, 0)
                  for label, v in values.items()]
    choice = choose(candidates, make_rule("clip_t", None, {"pixel_fidelity": 70.31}, {}, False))
    assert choice.best.label == "checkpoint-8"
    reasons = dict((c.label, why) for c, why in choice.excluded)
    assert reasons["checkpoint-6"] == "pixel_fidelity 70.30998 < 70.31"  # was "70.31 < 70.31"
    run = tmp_path / "run"
    eval_dir = RunLayout(run).eval.folder
    write_json(EvalLayout(eval_dir).best, best_record(choice, candidates, {}))
    html = render_report(report_context(run, [], [], eval_dir))
    table = html[html.index('<h2 id="best">'):html.index("</table>")]
    cells = re.findall(r'<td class="num">([0-9.]+)</td>', table)
    shown = cells[0::4]  # clip_t column: measures clip_t, pixel_fidelity, then cells, memorised
    assert sorted(shown) == sorted({"70.3141", "70.3123", "70.3101", "70.31"}), shown
    assert len(set(shown)) == 4
    assert "clip_t 70.3141" in html


def flat_png(path: Path, colour: tuple, box: tuple) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).rectangle(box, fill=colour)
    img.save(path)
    (path.with_suffix(".txt")).write_text("k4s4, a shape")
    return path


def test_held_out_images_are_not_training_images_and_score_as_generalisation(tmp_path):
    import shutil

    from sd3exp import holdout
    from sd3exp.evaluate.cells import Cell
    from sd3exp.evaluate.score import score_cells

    concept = tmp_path / "concept"
    concept.mkdir()
    for name, colour, box in (("a", (255, 0, 0), (8, 8, 40, 40)), ("b", (0, 0, 255), (20, 4, 60, 30)),
                              ("c", (0, 160, 0), (4, 30, 30, 60))):
        flat_png(concept / f"{name}.png", colour, box)
    cfg = compose_experiment("demo", ["demo=false", f"concepts.0.path={concept}", "concepts.0.holdout=1",
                                      f"paths.run_dir={tmp_path / 'run'}"])
    held, = holdout.held_out(cfg.concepts[0], ["a.png", "b.png", "c.png"], cfg.seed)
    trained = next(n for n in ("a.png", "b.png", "c.png") if n != held)
    renders = [shutil.copy(concept / held, tmp_path / "held.png"), shutil.copy(concept / trained, tmp_path / "seen.png")]
    cells = [Cell(f"checkpoint-{i + 2}", i + 2, 0, "k4s4, a shape", 0, "ok", paths=[Path(r)])
             for i, r in enumerate(renders)]
    (copy_of_held, copy_of_trained), _, _ = score_cells(cfg, cells)
    assert copy_of_held.scores["pixel_fidelity"] < 95 and copy_of_held.memorised is False  # was 100 and memorised
    assert copy_of_held.scores["holdout_pixel"] == pytest.approx(100.0)
    assert copy_of_trained.scores["pixel_fidelity"] == pytest.approx(100.0) and copy_of_trained.memorised is True
    assert copy_of_trained.scores["holdout_pixel"] < 95


def test_a_spread_below_the_measures_noise_looks_flat_on_scores_png():
    import io

    import numpy as np
    from PIL import Image

    from sd3exp import plots
    from sd3exp.evaluate.select import Candidate

    def line_height(values):
        candidates = [Candidate(f"checkpoint-{i}", i, {"pixel_fidelity": v}, 4, 0, 0) for i, v in enumerate(values)]
        image = np.asarray(Image.open(io.BytesIO(plots.score_plot(candidates, None, "pixel_fidelity"))).convert("RGB"))
        red = (np.abs(image.astype(int) - (200, 40, 40)).sum(axis=-1) < 60).any(axis=1)
        rows = np.flatnonzero(red)
        return rows.max() - rows.min(), image.shape[0]

    flat, height = line_height([70.3100, 70.3112, 70.3106, 70.3108])  # 0.0012 on a 0-100 scale
    climb, _ = line_height([60.0, 65.0, 70.0, 75.0])
    assert climb > height / 3  # a real difference fills the panel
    assert flat < 20, flat  # was a climb across the whole panel


def test_preference_model_files_resolve_from_the_hub_cache_and_are_refused_with_a_fetch_command(tmp_path, monkeypatch):
    from sd3exp.errors import ConfigError
    from sd3exp.schema import ScoringConfig

    repo = tmp_path / "hub" / "models--xswu--HPSv2"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "HPS_v2.1_compressed.pt").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = models.scoring_models(ScoringConfig(hps="xswu/HPSv2/HPS_v2.1_compressed.pt"))
    assert found == {"hps": (repo / "snapshots" / "abc" / "HPS_v2.1_compressed.pt").resolve()}
    with pytest.raises(ConfigError) as err:
        models.scoring_models(ScoringConfig(aesthetic=str(tmp_path / "nope.pth")))
    assert err.value.field == "eval.scoring.aesthetic" and "never downloads" in str(err.value)
    assert "hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth" in err.value.fix
    (tmp_path / "head.pth").write_bytes(b"head")
    with pytest.raises(ConfigError, match=r"eval\.scoring\.aesthetic_clip=None: the aesthetic predictor needs a CLIP"):
        models.scoring_models(ScoringConfig(aesthetic=str(tmp_path / "head.pth")))
