"""CLIP-T / CLIP-I / DINO-I: numeric checks against torchmetrics and direct cosines (tiny random
models built locally), and model folders refused before rendering."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sd3exp.errors import ConfigError
from sd3exp.evaluate import models
from sd3exp.evaluate.cells import Cell
from sd3exp.evaluate.score import concepts_of, score_cells, training_sets
from sd3exp.tinymodel import OFFLINE_ENV
from tests.helpers import compose_experiment, needs_trainer, reference_scores, run_cli, trainer_python
from tests.test_eval_cli import fake_lora_run

TINY = Path(__file__).with_name("tiny_clip.py")


def fake_model(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_a_missing_folder_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        models.configured(str(tmp_path / "nope"), None)
    assert err.value.field == "eval.scoring.clip" and "never downloads" in str(err.value)
    assert "hf download openai/clip-vit-large-patch14 --local-dir" in err.value.fix


def test_a_model_of_the_wrong_kind_is_refused(tmp_path):
    text_only = fake_model(tmp_path / "text", "clip_text_model")
    with pytest.raises(ConfigError, match=r"eval\.scoring\.clip=.*model_type 'clip_text_model'.*image and text towers"):
        models.configured(str(text_only), None)
    with pytest.raises(ConfigError, match=r"eval\.scoring\.dino=.*model_type 'clip'"):
        models.configured(None, str(fake_model(tmp_path / "clip", "clip")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read a model's config.json"):
        models.configured(str(broken), None)


def test_a_repo_id_resolves_to_the_hugging_face_cache_snapshot(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--facebook--dinov2-base"
    fake_model(repo / "snapshots" / "abc123", "dinov2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.configured(None, "facebook/dinov2-base") == {"dino": (repo / "snapshots" / "abc123").resolve()}


def test_eval_refuses_a_bad_clip_folder_before_rendering(tmp_path):
    run = tmp_path / "run"
    fake_lora_run(run)
    out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                  "eval.backend=comfyui", "eval.url=http://127.0.0.1:9", f"eval.scoring.clip={tmp_path / 'clip'}")
    assert out.returncode == 2 and "eval.scoring.clip=" in out.stderr and "Fix: point eval.scoring.clip" in out.stderr
    assert not (run / "eval").exists()


def shape(path: Path, background, colour, box=(8, 8, 40, 40)) -> Path:
    img = Image.new("RGB", (48, 48), background)
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-clip")
    subprocess.run([str(trainer_python()), str(TINY), "build", str(out)], check=True, capture_output=True,
                   env={**os.environ, **OFFLINE_ENV}, timeout=600)
    return out


@pytest.mark.slow
@needs_trainer
def test_clip_t_equals_torchmetrics_and_clip_i_dino_i_equal_direct_cosines(tiny_models, tmp_path):
    concept = tmp_path / "concept"
    concept.mkdir()
    shape(concept / "a.png", (0, 0, 255), (255, 0, 0))
    shape(concept / "b.png", (0, 0, 0), (255, 255, 0), (4, 10, 30, 44))
    renders = [shutil.copy(concept / "a.png", tmp_path / "copy.png"),
               shape(tmp_path / "green.png", (255, 255, 255), (0, 160, 0)),
               shape(tmp_path / "grey.png", (128, 128, 128), (128, 128, 128))]
    prompts = ["k4s4, red circle, blue background", "k4s4, a green dot", "a grey square"]
    cells = [Cell(f"checkpoint-{2 * i + 2}", 2 * i + 2, i, p, 0, "ok", paths=[Path(r)])
             for i, (p, r) in enumerate(zip(prompts, renders))]
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    cfg = compose_experiment("demo", [f"concepts.0.path={concept}", "demo=false", f"paths.run_dir={run}",
                                      f"eval.scoring.clip={tiny_models / 'clip'}",
                                      f"eval.scoring.dino={tiny_models / 'dino'}",
                                      f"eval.scoring.cache_dir={tmp_path / 'cache'}"])
    scored, fresh, _ = score_cells(cfg, cells)
    assert fresh == 3

    sets = training_sets(cfg)
    job = models.make_job(models.configured(cfg.eval.scoring.clip, cfg.eval.scoring.dino),
                          {cid: list(zip(s.paths, s.digests)) for cid, s in sets.items()},
                          [{"id": i, "image": str(r), "prompt": p, "concepts": concepts_of(p, sets)}
                           for i, (p, r) in enumerate(zip(prompts, renders))], tmp_path / "unused")
    reference = reference_scores(TINY, job, tmp_path)
    for i, cell in enumerate(scored):
        for measure in ("clip_t", "clip_i", "dino_i"):
            assert cell.scores[measure] == pytest.approx(reference[str(i)][measure], abs=1e-4), (i, measure)
    assert scored[0].memorised is True  # a copy of a.png: cosine 1 to one training image
    assert scored[2].memorised is False
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.npy"))
    assert cached == sorted(f"{d}.npy" for d in sets["shapes"].digests for _ in range(2))
