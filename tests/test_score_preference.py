"""PickScore, the LAION aesthetic predictor v2, HPSv2.1 and DINO's CLS token against each model's reference
code (tiny random models of the same architectures, built locally), and model folders that do not load
refused before rendering."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sd3exp.errors import ConfigError
from sd3exp.evaluate import models
from sd3exp.evaluate.cells import Cell
from sd3exp.evaluate.score import concepts_of, holdout_sets, score_cells, training_sets
from sd3exp.tinymodel import OFFLINE_ENV
from tests.comfy_standin import StandIn
from tests.helpers import compose_experiment, needs_trainer, reference_scores, run_cli, trainer_python
from tests.test_eval_cli import PROMPTS, fake_lora_run

TINY = Path(__file__).with_name("tiny_preference.py")
pytestmark = [needs_trainer]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-preference")
    subprocess.run([str(trainer_python()), str(TINY), "build", str(out)], check=True, capture_output=True,
                   env={**os.environ, **OFFLINE_ENV}, timeout=900)
    return out


def shape(path: Path, background, colour, box=(8, 8, 40, 40), size=(48, 48)) -> Path:
    img = Image.new("RGB", size, background)
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    img.save(path)
    return path


def preference_overrides(tiny: Path, tmp_path: Path) -> list:
    return [f"eval.scoring.pickscore={tiny / 'pickscore'}", f"eval.scoring.pickscore_processor={tiny / 'clip-h'}",
            f"eval.scoring.aesthetic={tiny / 'aesthetic.pth'}", f"eval.scoring.aesthetic_clip={tiny / 'aesthetic-clip'}",
            f"eval.scoring.hps={tiny / 'hps' / 'HPS_v2.1_compressed.pt'}", f"eval.scoring.dino={tiny / 'vit-dino'}",
            f"eval.scoring.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_pickscore_aesthetic_hps_and_dino_equal_their_reference_code(tiny, tmp_path):
    concept = tmp_path / "concept"
    concept.mkdir()
    shape(concept / "a.png", (0, 0, 255), (255, 0, 0))
    shape(concept / "b.png", (0, 0, 0), (255, 255, 0), (4, 10, 30, 44))
    shape(concept / "c.png", (255, 255, 255), (0, 0, 0), (10, 4, 44, 30))
    renders = [shape(tmp_path / "wide.png", (0, 0, 255), (255, 0, 0), (8, 4, 60, 28), size=(64, 32)),
               shape(tmp_path / "green.png", (255, 255, 255), (0, 160, 0)),
               shape(tmp_path / "tall.png", (128, 128, 128), (20, 20, 20), (2, 8, 20, 50), size=(24, 60))]
    prompts = ["k4s4, red circle, blue background", "k4s4, a green dot", "a grey square"]
    cells = [Cell(f"checkpoint-{2 * i + 2}", 2 * i + 2, i, p, 0, "ok", paths=[r])
             for i, (p, r) in enumerate(zip(prompts, renders))]
    cfg = compose_experiment("demo", [f"concepts.0.path={concept}", "concepts.0.holdout=1", "demo=false",
                                      f"paths.run_dir={tmp_path / 'run'}", *preference_overrides(tiny, tmp_path)])
    (tmp_path / "run" / "eval").mkdir(parents=True)
    scored, fresh, _ = score_cells(cfg, cells)
    assert fresh == 3

    sets, held = training_sets(cfg), holdout_sets(cfg)
    assert len(held["shapes"].paths) == 1 and len(sets["shapes"].paths) == 2
    job = models.make_job(models.scoring_models(cfg.eval.scoring),
                          {cid: list(zip(s.paths, s.digests)) for cid, s in sets.items()},
                          [{"id": i, "image": str(r), "prompt": p, "concepts": concepts_of(p, sets)}
                           for i, (p, r) in enumerate(zip(prompts, renders))], tmp_path / "unused",
                          {cid: list(zip(s.paths, s.digests)) for cid, s in held.items()})
    reference = reference_scores(TINY, job, tmp_path)
    for i, cell in enumerate(scored):
        for measure in ("pickscore", "aesthetic", "hps", "dino_i", "holdout_dino"):
            assert cell.scores[measure] == pytest.approx(reference[str(i)][measure], abs=1e-4), (i, measure)
    assert len({round(c.scores["hps"], 6) for c in scored}) == 3  # the measures tell the renders apart


def test_a_model_with_missing_weights_or_without_its_processor_is_refused_before_rendering(tiny, tmp_path):
    python = trainer_python()
    with pytest.raises(ConfigError, match=r"eval\.scoring\.dino=.*cannot be loaded.*no weights for 2 parameter"):
        models.check_loading(models.configured(None, str(tiny / "vit-broken")), python, tmp_path / "cache", 600)
    models.check_loading(models.configured(None, str(tiny / "vit-dino")), python, tmp_path / "cache", 600)
    assert len(list((tmp_path / "cache" / "loaded").iterdir())) == 1  # remembered: not loaded again

    run = tmp_path / "run"
    fake_lora_run(run)
    out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                  "eval.backend=comfyui", "eval.url=http://127.0.0.1:9", f"eval.scoring.clip={tiny / 'pickscore'}",
                  f"eval.scoring.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"eval.scoring.clip='{tiny / 'pickscore'}': cannot be loaded" in out.stderr
    assert not (run / "eval").exists()


def test_a_scoring_failure_after_rendering_exits_non_zero_naming_the_log_that_exists(tiny, tmp_path):
    run, concept = tmp_path / "run", tmp_path / "concept"
    fake_lora_run(run)
    concept.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        shape(concept / f"{name}.png", (0, 0, 255), colour)
        (concept / f"{name}.txt").write_text("k4s4, a shape")
    (tmp_path / "not-a-folder").write_text("")  # the embedding cache cannot be made: the worker fails
    common = ["experiment=demo_quick", "stage=eval", "demo=false", f"concepts.0.path={concept}", f"hydra.run.dir={run}",
              "eval.backend=comfyui", f"eval.models_dir={tmp_path / 'models'}", "eval.include_final=false",
              f"eval.prompts={json.dumps(PROMPTS[:1])}", f"eval.scoring.dino={tiny / 'vit-dino'}"]
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 models_dir=tmp_path / "models") as server:
        out = run_cli(*common, f"eval.url={server.url}", f"eval.scoring.cache_dir={tmp_path / 'not-a-folder'}")
        assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
        log = run / "eval" / "score.log"
        assert f"see {log}" in out.stderr and log.is_file() and "not-a-folder" in log.read_text()
        assert "scored" in out.stdout and "eval.next" not in out.stderr
        again = run_cli(*common, f"eval.url={server.url}", f"eval.scoring.cache_dir={tmp_path / 'cache'}")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    cells = json.loads((run / "eval" / "cells.json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    assert all("dino_i" in c["scores"] for c in cells)
