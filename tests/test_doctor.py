"""`sd3exp doctor`: one line per check, exit 1 when something blocks the experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sd3exp.project import ROOT
from tests.comfy_standin import StandIn
from tests.conftest import compose_experiment, needs_trainer

NO_GPU = shutil.which("nvidia-smi") is None


def doctor(tmp_path, *overrides: str, token: bool = False) -> subprocess.CompletedProcess:
    """`sd3exp doctor` as a user runs it, with an empty Hugging Face home (and a token when asked), offline."""
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    if token:
        (home / "token").write_text("hf_doctorFakeToken0123456789")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sd3exp", "doctor", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_assets():
    from sd3exp.demo import ensure_demo_assets

    ensure_demo_assets(compose_experiment("demo_quick"), with_model=True)


@needs_trainer
def test_fantasy_art_names_the_gpu_the_model_and_the_token(tmp_path):
    out = doctor(tmp_path, "experiment=fantasy_art")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("ok    trainer   SimpleTuner 4.10.1") for line in lines), out.stdout
    if NO_GPU:
        assert "FAIL  gpu       no CUDA GPU visible to torch" in lines, out.stdout
    assert ("FAIL  model     stabilityai/stable-diffusion-3-medium-diffusers: not in the Hugging Face cache "
            f"({tmp_path / 'hf-home' / 'hub'}); HF_HUB_OFFLINE is set") in lines, out.stdout
    assert f"warn  token     no Hugging Face token (HF_TOKEN unset, no {tmp_path / 'hf-home' / 'token'})" in lines
    assert "`hf download stabilityai/stable-diffusion-3-medium-diffusers`" in out.stdout
    assert lines[-1].startswith("doctor: fantasy_art: ") and "block this experiment" in lines[-1]


@needs_trainer
def test_the_demo_is_ready(tmp_path, demo_assets):
    out = doctor(tmp_path, "experiment=demo_quick", token=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok    token     a Hugging Face token was found in {tmp_path / 'hf-home' / 'token'}" in out.stdout
    assert "hf_doctorFakeToken" not in out.stdout + out.stderr
    assert "ok    model     " in out.stdout and "a local folder" in out.stdout
    assert "ok    disk      " in out.stdout and "checkpoint(s) of about" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("doctor: demo_quick: ready")


@needs_trainer
def test_comfyui_reachable_and_a_missing_base_model_named(tmp_path, demo_assets):
    with StandIn(tmp_path / "out", unet_names=["other.safetensors"]) as server:
        out = doctor(tmp_path, "experiment=demo_quick", "eval.backend=comfyui", f"eval.url={server.url}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"ok    comfyui   reachable at {server.url}, ComfyUI standin" in out.stdout
    assert ("FAIL  comfyui   node 1 UNETLoader.unet_name='sd3_medium_transformer.safetensors' is not among the "
            "1 ComfyUI lists") in out.stdout


def test_an_unreachable_comfyui_blocks(tmp_path, demo_assets):
    out = doctor(tmp_path, "experiment=demo_quick", "eval.backend=comfyui", "eval.url=http://127.0.0.1:9")
    assert out.returncode == 1 and "FAIL  comfyui   cannot reach ComfyUI at http://127.0.0.1:9" in out.stdout, out.stdout
