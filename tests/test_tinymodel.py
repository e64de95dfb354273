"""The tiny random SD3 pipeline: ComfyUI-compatible shapes, loads in diffusers, never overwritten."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sd3exp.errors import TrainerError
from sd3exp.tinymodel import OFFLINE_ENV, build_tiny_model
from tests.conftest import needs_trainer, trainer_python

PYTHON = trainer_python()
pytestmark = [pytest.mark.trainer, needs_trainer]

LOAD_CHECK = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1])
embeds, _, pooled, _ = pipe.encode_prompt("k4s4, red circle", None, None, do_classifier_free_guidance=False)
image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96, num_inference_steps=1,
             guidance_scale=1.0, output_type="pt").images
print(tuple(embeds.shape[-1:]), tuple(pooled.shape), tuple(image.shape))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "sd3", PYTHON, seed=7)


def test_transformer_has_comfyui_shapes(model: Path) -> None:
    config = json.loads((model / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert config["attention_head_dim"] == 64
    assert config["num_attention_heads"] == config["num_layers"] == 2
    assert (config["in_channels"], config["out_channels"], config["patch_size"]) == (16, 16, 2)
    assert (config["joint_attention_dim"], config["pooled_projection_dim"]) == (4096, 2048)
    assert config["caption_projection_dim"] == 128 and config["pos_embed_max_size"] >= 32


def test_folder_is_a_small_seeded_pipeline(model: Path) -> None:
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                 "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert (model / part).is_dir(), part
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert json.loads((model / "tiny_sd3.json").read_text())["seed"] == 7
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert 5e6 < size < 25e6
    assert [p.name for p in model.parent.iterdir()] == ["sd3"]  # no temp folder left behind


def test_diffusers_loads_and_runs_it(model: Path, tmp_path: Path) -> None:
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([str(PYTHON), "-c", LOAD_CHECK, str(model)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "(4096,) (1, 2048) (1, 3, 64, 96)"


def test_same_seed_is_reused_other_seed_is_refused(model: Path, capsys: pytest.CaptureFixture) -> None:
    stamp = (model / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(model, PYTHON, seed=7) == model
    assert "already" in capsys.readouterr().out
    with pytest.raises(TrainerError, match="refusing to overwrite"):
        build_tiny_model(model, PYTHON, seed=8)
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_same_seed_gives_the_same_weights(model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "sd3", PYTHON, seed=7)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        assert (again / name).read_bytes() == (model / name).read_bytes()


def test_missing_python_is_a_trainer_error(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="does not exist"):
        build_tiny_model(tmp_path / "sd3", tmp_path / "no-python", seed=0)
