"""`stage=eval eval.backend=comfyui` through the CLI, against the stand-in ComfyUI server."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sd3exp.runfolder import exclusive
from tests.comfy_standin import StandIn
from tests.conftest import run_cli

PROMPTS = ["k4s4, red circle", "k4s4, blue square"]


def fake_lora_run(run: Path, steps=(2, 4, 6)) -> None:
    """LoRA checkpoints as sd3exp's trainer leaves them (the stand-in never reads the weights)."""
    training = run / "training"
    for step in steps:
        (training / f"checkpoint-{step}").mkdir(parents=True)
        (training / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").write_bytes(b"lora %d" % step)
    (training / ".sd3exp-run").write_text(f"{run.resolve()}\n")


def test_comfyui_sweep_with_a_base_column_and_a_failing_cell(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    fail = lambda g: "CUDA out of memory" if ("checkpoint-4." in json.dumps(g) and PROMPTS[1] in json.dumps(g)) else None
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 lora_names=[f"run/checkpoint-{s}.safetensors" for s in (2, 4, 6)], error_if=fail) as server:
        out = run_cli("experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16",
                      f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
                      f"eval.models_dir={models}", "eval.include_final=false", f"eval.prompts={json.dumps(PROMPTS)}",
                      "+eval.workflow_inputs.7.vae_name=my_sd3_vae.safetensors", "eval.include_base=true")
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 of 8 cells failed" in out.stderr and "CUDA out of memory" in out.stderr
    assert (models / "loras" / "run" / "checkpoint-4.safetensors").resolve() == \
        (run / "training" / "checkpoint-4" / "pytorch_lora_weights.safetensors").resolve()
    cells = json.loads((run / "eval" / "cells.json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    assert [c["status"] for c in cells].count("ok") == 7
    assert list(dict.fromkeys(c["label"] for c in cells)) == ["base", "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [c["label"] for c in cells if c["status"] != "ok"] == ["checkpoint-4"]
    grid = Image.open(run / "eval" / "grid.png")
    assert grid.width > grid.height  # base + 3 checkpoint columns, 2 prompt rows
    assert "base model" in (run / "eval" / "report.html").read_text()
    saved = json.loads(Image.open(next((run / "eval" / "images").glob("*.png"))).text["prompt"])
    assert saved["7"]["inputs"]["vae_name"] == "my_sd3_vae.safetensors"


def test_a_second_evaluation_renders_only_what_changed(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    fail = lambda g: "CUDA out of memory" if ("checkpoint-4." in json.dumps(g) and PROMPTS[1] in json.dumps(g)) else None
    common = ["experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
              "eval.backend=comfyui", f"eval.models_dir={models}", "eval.include_final=false", "eval.include_base=true"]
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"],
                 lora_names=[f"run/checkpoint-{s}.safetensors" for s in (2, 4, 6)], error_if=fail) as server:
        first = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(PROMPTS)}")
        assert first.returncode == 3 and len(server.queued) == 8, first.stderr[-2000:]
        before = {p.name: p.read_bytes() for p in (run / "eval" / "images").iterdir()}
        server.error_if = lambda g: None
        more = ["k4s4, green triangle", *PROMPTS]  # a new prompt, first: the old ones move to rows 1 and 2
        second = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(more)}")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert len(server.queued) == 8 + 4 + 1  # the new row for 4 columns, and the cell that failed
    assert "reused 7 unchanged cell(s)" in second.stdout
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert [(c["label"], c["prompt"], c["status"]) for c in cells] == [
        (label, prompt, "ok") for label in ("base", "checkpoint-2", "checkpoint-4", "checkpoint-6") for prompt in more]
    moved = {f"{label}_p{i + 1}_s0.png": f"{label}_p{i}_s0.png" for label in ("base", "checkpoint-2", "checkpoint-6")
             for i in (0, 1)}
    assert all((run / "eval" / "images" / new).read_bytes() == before[old] for new, old in moved.items())
    assert sorted(before) == sorted(p.name for p in (run / "eval.previous-1" / "images").iterdir())


def test_a_run_can_be_evaluated_while_it_trains_but_not_twice_at_once(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    (run / "training" / "pytorch_lora_weights.safetensors").write_bytes(b"final, maybe half written")
    names = [f"run/{label}.safetensors" for label in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "final")]
    with StandIn(tmp_path / "comfy-out", unet_names=["sd3_medium_transformer.safetensors"], lora_names=names) as server:
        evaluate = ["experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                    "eval.backend=comfyui", f"eval.url={server.url}", f"eval.models_dir={models}",
                    f"eval.prompts={json.dumps(PROMPTS[:1])}", "eval.include_base=false"]
        assert run_cli(*evaluate[:3], "stage=compile", *evaluate[3:5]).returncode == 0
        with exclusive(run, "train"):  # as `stage=train` holds it
            during = run_cli(*evaluate)
            refused = run_cli("experiment=demo_lora", "stage=train", "demo=false", "concepts.0.num_images=16",
                              f"hydra.run.dir={run}")
        with exclusive(run, "eval"):
            twice = run_cli(*evaluate)
        after = run_cli(*evaluate)
    assert during.returncode == 0, during.stderr[-2000:]
    assert "training is still running in another process" in during.stdout
    assert refused.returncode != 0 and "another sd3exp process is preparing or training" in refused.stderr
    assert twice.returncode != 0 and "another sd3exp process is evaluating" in twice.stderr
    assert after.returncode == 0 and "reused 3 unchanged cell(s)" in after.stdout, after.stderr[-2000:]
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert [c["label"] for c in cells] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]
