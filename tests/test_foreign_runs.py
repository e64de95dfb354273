"""Evaluating checkpoints sd3exp did not train, or a run folder that moved; a run's identity when the
checkout moves."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from sd3exp.compile import config_hash
from tests.comfy_standin import StandIn, save_safetensors
from tests.helpers import compose_experiment, run_cli
from tests.test_eval_cli import PROMPTS, fake_lora_run, lora_tensors, simpletuner_metadata


def evaluate(run, models, url, *extra):
    return run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                   "eval.backend=comfyui", f"eval.url={url}", f"eval.models_dir={models}", "eval.include_final=false",
                   f"eval.prompts={json.dumps(PROMPTS[:1])}", *extra)


def test_checkpoints_of_simpletuner_run_by_hand_are_evaluated(tmp_path):
    by_hand, models = tmp_path / "simpletuner-output", tmp_path / "comfy-models"
    for step in (10, 20):
        save_safetensors(by_hand / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors", lora_tensors(step),
                         simpletuner_metadata(4, 4))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        out = evaluate(tmp_path / "run", models, server.url, f"paths.training_dir={by_hand}")
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    assert "sd3exp did not train" in out.stdout
    cells = json.loads((tmp_path / "run" / "eval" / "cells.json").read_text())
    assert [(c["label"], c["status"]) for c in cells] == [("checkpoint-10", "ok"), ("checkpoint-20", "ok")]
    assert sorted(p.name for p in by_hand.iterdir()) == ["checkpoint-10", "checkpoint-20"]  # nothing written there


def test_a_moved_run_folder_is_evaluated_where_it_is_now(tmp_path):
    before, after, models = tmp_path / "disk1" / "run", tmp_path / "disk2" / "run", tmp_path / "comfy-models"
    compiled = run_cli("experiment=demo_quick", "stage=compile", "demo=false", "concepts.0.num_images=16",
                       f"hydra.run.dir={before}")
    assert compiled.returncode == 0, compiled.stderr[-1500:]
    fake_lora_run(before, steps=(2,))
    after.parent.mkdir()
    before.rename(after)
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        out = evaluate(after, models, server.url)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    assert f"of the run folder {before.resolve()} (moved or copied since)" in out.stdout


def test_the_config_hash_does_not_depend_on_where_the_checkout_or_the_run_folder_is():
    def sha(root: str, *overrides: str) -> str:
        cfg = compose_experiment("demo", [f"paths.root_dir={root}", *overrides], run_dir=f"{root}/outputs/demo")
        return config_hash(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))

    assert sha("/home/a/sd3exp") == sha("/mnt/b/checkout")
    assert sha("/home/a/sd3exp") != sha("/home/a/sd3exp", "model.path=/models/another-tiny-sd3")
