"""Issue 18 items 1-3: the user's Hugging Face login and hub cache reach the trainer, hub ids in the
diffusers evaluation, its device/dtype choice and per-cell timeout."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from sd3exp import hub, train
from sd3exp.errors import ConfigError, EvalError
from sd3exp.evaluate import diffusers_backend as backend
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.workers.render_device import DEVICES, DTYPES, pick_device, pick_dtype
from tests.conftest import needs_trainer, trainer_python

FAKE_TOKEN = "hf_sd3expFakeTokenNeverSent0123456789"
GET_TOKEN = "import huggingface_hub, json, os; print(json.dumps([huggingface_hub.get_token(), os.environ['HF_HUB_CACHE']]))"


def user_home(tmp_path: Path, monkeypatch) -> Path:
    """A Hugging Face home holding a token as `hf auth login` leaves it, and nothing else of the user's."""
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(FAKE_TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    for key in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    return home


# ---- device and dtype (pure) ----

@given(st.booleans(), st.booleans())
def test_auto_device_prefers_cuda_then_mps_then_cpu(cuda, mps):
    assert pick_device("auto", cuda, mps) == ("cuda" if cuda else "mps" if mps else "cpu")


@pytest.mark.parametrize("device,cuda,mps", [("cuda", False, True), ("mps", True, False), ("gpu", True, True)])
def test_a_device_that_is_not_there_is_refused(device, cuda, mps):
    with pytest.raises(ValueError, match=f"eval.device=.?{device}"):
        pick_device(device, cuda, mps)


@pytest.mark.parametrize("device,bf16,expected", [("cuda", True, "bf16"), ("cuda", False, "fp16"),
                                                  ("mps", False, "fp16"), ("cpu", False, "fp32")])
def test_auto_dtype(device, bf16, expected):
    assert pick_dtype("auto", device, bf16) == expected


@given(st.sampled_from(DTYPES[1:]), st.sampled_from(DEVICES[1:]), st.booleans())
def test_an_explicit_dtype_is_kept(dtype, device, bf16):
    assert pick_dtype(dtype, device, bf16) == dtype


# ---- per-cell timeout ----

def test_the_timeout_is_per_cell_not_per_sweep(tmp_path):
    """Four cells 0.4 s apart under a 1 s limit: a sweep-long limit of 1 s killed the worker at the third."""
    lines = [json.dumps({"label": "a", "step": None, "prompt_index": i, "seed": 0, "status": "ok",
                         "path": f"/i/{i}.png", "error": "", "seconds": 0.4}) for i in range(4)]
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + "".join(f"sleep 0.4\necho '{line}'\n" for line in lines))
    script.chmod(0o755)
    cells = backend.render_cells(tmp_path, [Checkpoint(None, "a", "full", Path("/x/a"))], list("pqrs"), [0],
                                 tmp_path / "eval" / "images", script, timeout_s=1.0, progress=False)
    assert [c.status for c in cells] == ["ok"] * 4, [c.error for c in cells]


# ---- the user's login and cache, seen from the trainer's environment ----

def test_token_source_names_where_never_what(tmp_path, monkeypatch):
    home = user_home(tmp_path, monkeypatch)
    assert hub.token_source() == str(home / "token")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert hub.token_source() == "the HF_TOKEN environment variable"
    monkeypatch.delenv("HF_TOKEN")
    (home / "token").unlink()
    assert hub.token_source() is None


def test_default_home_follows_xdg_cache_home(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert hub.hub_cache(env) == tmp_path / "huggingface" / "hub"
    assert hub.token_path(env) == tmp_path / "huggingface" / "token"


@needs_trainer
def test_the_trainer_environment_sees_the_users_token_and_hub_cache(tmp_path, monkeypatch):
    """huggingface_hub in the trainer venv, run with the trainer's environment, finds the login;
    sd3exp's XDG_CACHE_HOME and HF_HOME for the run do not hide it."""
    home = user_home(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = train.trainer_environment(trainer_python().parent, tmp_path / "run", cpu=True, offline=True)
    out = subprocess.run([str(trainer_python()), "-c", GET_TOKEN], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == [FAKE_TOKEN, str(home / "hub")]
    assert env["HF_HOME"] == str(tmp_path / "run" / ".hf")  # the user's accelerate config stays out


# ---- a gated / missing model before training, a hub id in the evaluation ----

def cached_repo(cache: Path, repo_id: str, files: dict) -> Path:
    """A repo in huggingface_hub's documented cache layout: blobs, snapshots/<rev>/ links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    for name, text in files.items():
        blob = repo / "blobs" / f"blob-{abs(hash(name))}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(text)
        link = repo / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


@needs_trainer
def test_a_model_not_in_the_cache_offline_is_named_with_the_token_state_and_fixes(tmp_path, monkeypatch):
    home = user_home(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        hub.require_model("stabilityai/stable-diffusion-3-medium-diffusers", trainer_python())
    text = str(err.value)
    assert "model.path='stabilityai/stable-diffusion-3-medium-diffusers'" in text
    assert f"a token was found in {home / 'token'}" in text and FAKE_TOKEN not in text
    assert "`hf download stabilityai/stable-diffusion-3-medium-diffusers`" in text
    assert "model.path=/path/to/model-folder" in text


@needs_trainer
def test_a_cached_repo_id_resolves_to_its_snapshot_offline(tmp_path, monkeypatch):
    user_home(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cached_repo(tmp_path / "hf-home" / "hub", "org/pipe", {"model_index.json": "{}"})
    assert backend.base_folder("org/pipe", trainer_python()) == snapshot
    with pytest.raises(EvalError, match="`hf download org/other`"):
        backend.base_folder("org/other", trainer_python())
