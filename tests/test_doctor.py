"""`sd3exp doctor`: one line per check, exit 1 when something blocks the experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sd3exp.project import ROOT
from tests.comfy_standin import StandIn
from tests.helpers import compose_experiment, needs_trainer

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


def test_disk_blocks_when_the_kept_checkpoints_do_not_fit(tmp_path):
    """A sparse 10 TB transformer: three kept LoRA checkpoints of 5 % of it exceed any test machine's disk."""
    from types import SimpleNamespace

    from sd3exp.doctor import disk_check
    from sd3exp.hub import ModelState

    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    with open(weights, "wb") as f:
        f.truncate(10 * 1024**4)
    cfg = compose_experiment("demo_quick", [f"paths.output_root={tmp_path / 'outputs'}"])
    plan = SimpleNamespace(checkpoints_kept=[2, 4, 6])
    check = disk_check(cfg, plan, ModelState("m", "local", str(tmp_path / "model")))
    assert check.status == "FAIL" and "keeps 3 checkpoint(s) of about 512.0 GB = 1536.0 GB" in check.found, check
    assert f"free at {tmp_path}" in check.found and "checkpointing.keep" in check.fix


def test_gpus_are_listed_and_a_missing_one_blocks_a_real_model():
    from sd3exp.doctor import gpu_checks

    cfg = compose_experiment("fantasy_art")
    none = gpu_checks(cfg, {"torch": "2.14.1", "cuda": "13.0", "gpus": []})
    assert [(c.name, c.status) for c in none] == [("torch", "ok"), ("gpu", "FAIL")]
    one = gpu_checks(cfg, {"torch": "2.14.1", "cuda": "13.0", "gpus": [{"name": "H100", "memory": 80 * 1024**3}]})
    if NO_GPU:  # nvidia-smi's own line replaces torch's where it runs
        assert one[1].line() == "ok    gpu 0     H100, 80.0 GB"
    assert all(c.status == "ok" for c in one)
