"""`stage=eval` scores every cell and names the best checkpoint (stand-in ComfyUI server)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sd3exp.evaluate.grid import BEST_GREEN
from tests.comfy_standin import StandIn
from tests.helpers import run_cli
from tests.test_eval_cli import PROMPTS, fake_lora_run


def render_colour(tmp_path, label="checkpoint-2"):
    """The colour the stand-in renders for a checkpoint of `fake_lora_run` (seed 0, any prompt), read from
    a probe evaluation of a run of its own."""
    probe, models = tmp_path / "probe", tmp_path / "probe-models"
    fake_lora_run(probe)
    with StandIn(tmp_path / "probe-out", unet_names=["sd3_medium_transformer.safetensors"], models_dir=models) as server:
        out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={probe}",
                      "eval.backend=comfyui", f"eval.url={server.url}", f"eval.models_dir={models}",
                      "eval.include_final=false", "eval.scoring.enabled=false", f"eval.prompts={json.dumps(PROMPTS[:1])}")
    assert out.returncode == 0, out.stderr[-2000:]
    cells = json.loads((probe / "eval" / "cells.json").read_text())
    image = probe / "eval" / next(c for c in cells if c["label"] == label)["paths"][0]
    return Image.open(image).convert("RGB").getpixel((0, 0))


def last_best(stdout):
    """The last `best checkpoint:` line (the trackers' lines may follow it, sd3exp/tracking/)."""
    return [line for line in stdout.strip().splitlines() if line.startswith("best checkpoint:")][-1]


def concept_folder(path, render):
    """Two training images: `render` (a checkpoint's render, so it scores 100) and a white square."""
    path.mkdir()
    for name, colour in (("a", render), ("b", (255, 255, 255))):
        Image.new("RGB", (64, 64), colour).save(path / f"{name}.png")
        (path / f"{name}.txt").write_text("k4s4, a square")
    return path


def test_eval_scores_cells_writes_best_json_and_rescoring_scores_only_new_cells(tmp_path):
    run, concept = tmp_path / "run", concept_folder(tmp_path / "concept", render_colour(tmp_path))
    fake_lora_run(run)
    records = [{"schema_version": 1, "timestamp": "t", "step": s, "metrics": {"train_loss": 1 / s, "learning_rate": 1e-4}}
               for s in range(1, 7)]  # as SimpleTuner 4.10.1's local_metrics.py appends them (report_to=simpletuner)
    (run / "training" / "training_metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n{half a line")
    def fail(g):
        return "CUDA out of memory" if ("checkpoint-4-" in json.dumps(g) and PROMPTS[1] in json.dumps(g)) else None
    common = ["experiment=demo_quick", "stage=eval", "demo=false", f"concepts.0.path={concept}", f"hydra.run.dir={run}",
              "eval.backend=comfyui", f"eval.models_dir={tmp_path / 'models'}", "eval.include_final=false",
              "eval.include_base=true"]
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 models_dir=tmp_path / "models", error_if=fail) as server:
        first = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(PROMPTS)}")
        first_html = (run / "eval" / "report.html").read_text()  # a first evaluation's report shows its scores
        server.error_if = lambda g: None
        second = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(['k4s4, a dot', *PROMPTS])}")
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    assert "scored 7 new cell(s), 0 kept from the last evaluation; 1 failed cell(s) left out" in first.stdout
    line = first.stdout.strip().splitlines()[-1]
    assert line.startswith("best checkpoint: step 2 (checkpoint-2): pixel_fidelity 100, best of 3 eligible (rule: "
                           "highest mean pixel_fidelity; ties go to the earlier step)"), line
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "scored 5 new cell(s), 7 kept from the last evaluation" in second.stdout
    best = json.loads((run / "eval" / "best.json").read_text())
    assert best["best"]["label"] == "checkpoint-2" and best["best"]["step"] == 2
    assert best["best"]["checkpoint"].endswith("checkpoint-2/pytorch_lora_weights.safetensors")
    assert best["best"]["scores"]["pixel_fidelity"] == 100.0 and best["best"]["scores"]["drift"] > 0
    assert [r["label"] for r in best["runners_up"]] == ["checkpoint-4", "checkpoint-6"]
    assert best["rule"]["objective"] == "pixel_fidelity" and best["failed_cells"] == 0
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert all(c["scores"]["drift"] == 0.0 for c in cells if c["label"] == "base")  # the base model's own render
    assert all(c["scores"]["drift"] > 0 for c in cells if c["label"] != "base" and c["status"] == "ok")
    assert {c["label"] for c in cells if c["memorised"]} == {"checkpoint-2"}  # a copy of training image a
    for html in (first_html, (run / "eval" / "report.html").read_text()):
        assert 'id="best"' in html and 'src="scores.png"' in html and 'src="training.png"' in html
    assert (run / "eval" / "scores.png").is_file() and Image.open(run / "eval" / "training.png").format == "PNG"
    grid = np.asarray(Image.open(run / "eval" / "grid.png").convert("RGB"))
    assert (grid == BEST_GREEN).all(axis=-1).sum() > 100  # the chosen column's frame
    (run / "eval" / "grid.png").unlink()
    rebuilt = run_cli(*[a for a in common if a != "stage=eval"], "stage=report")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    grid = np.asarray(Image.open(run / "eval" / "grid.png").convert("RGB"))
    assert (grid == BEST_GREEN).all(axis=-1).sum() > 100  # stage=report keeps it


def test_an_unknown_objective_is_refused_before_rendering(tmp_path):
    run = tmp_path / "run"
    fake_lora_run(run)
    out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                  "eval.backend=comfyui", "eval.url=http://127.0.0.1:9", "eval.select.objective=fidelity")
    assert out.returncode == 2
    assert "eval.select.objective='fidelity': not a measure" in out.stderr and "pixel_fidelity" in out.stderr
    assert not (run / "eval").exists()


def test_scoring_off_keeps_the_evaluation_as_it_was(tmp_path):
    run = tmp_path / "run"
    fake_lora_run(run)
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 models_dir=tmp_path / "models") as server:
        out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16",
                      f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
                      f"eval.models_dir={tmp_path / 'models'}", "eval.include_final=false",
                      "eval.scoring.enabled=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best checkpoint" not in out.stdout and not (run / "eval" / "best.json").exists()
    assert all(c["scores"] == {} for c in json.loads((run / "eval" / "cells.json").read_text()))


def test_changing_the_rule_or_scoring_evaluates_again_without_rendering(tmp_path):
    run, concept = tmp_path / "run", concept_folder(tmp_path / "concept", render_colour(tmp_path))
    fake_lora_run(run)
    common = ["experiment=demo_quick", "stage=eval", "demo=false", f"concepts.0.path={concept}", f"hydra.run.dir={run}",
              "eval.backend=comfyui", f"eval.models_dir={tmp_path / 'models'}", "eval.include_final=false",
              f"eval.prompts={json.dumps(PROMPTS)}"]
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 models_dir=tmp_path / "models") as server:
        first = run_cli(*common, f"eval.url={server.url}")
        same = run_cli(*common, f"eval.url={server.url}")
        rule = run_cli(*common, f"eval.url={server.url}", "+eval.select.at_least.pixel_fidelity=101")
        thumbs = run_cli(*common, f"eval.url={server.url}", "eval.scoring.thumbnail=8")
        queued = len(server.queued)
    assert first.returncode == 0, first.stderr[-2000:]
    assert same.returncode == 0 and "already evaluated" in same.stdout
    assert last_best(same.stdout).startswith("best checkpoint: step 2 (checkpoint-2)")
    assert rule.returncode == 0, rule.stderr[-2000:]
    assert "reused 6 unchanged cell(s)" in rule.stdout and "scored 0 new cell(s), 6 kept" in rule.stdout, rule.stdout[-1500:]
    assert last_best(rule.stdout) == (
        "best checkpoint: none (no checkpoint meets the rule: highest mean pixel_fidelity where "
        "pixel_fidelity >= 101; ties go to the earlier step)")
    assert "scored 6 new cell(s), 0 kept" in thumbs.stdout
    assert queued == 6  # rendered once
