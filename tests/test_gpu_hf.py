"""Issue 18 items 1-3: the user's Hugging Face login and hub cache reach the trainer, hub ids in the
diffusers evaluation, its device/dtype choice and per-cell timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sd3exp import hub, train
from sd3exp.errors import ConfigError, EvalError
from sd3exp.evaluate import diffusers_backend as backend
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.project import ROOT
from sd3exp.workers.render_device import DEVICES, DTYPES, pick_device, pick_dtype
from tests.helpers import needs_trainer, trainer_python

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


# ---- end to end: demo_quick trained and evaluated from a repo id in the hub cache, with a login ----

PROBE = """#!/usr/bin/env python
# run by SimpleTuner after a checkpoint (--post_checkpoint_script), inside the trainer's environment
import hashlib, json, os, sys
import huggingface_hub
token = huggingface_hub.get_token() or ""
with open({report!r}, "w") as f:
    json.dump({{"sha256": hashlib.sha256(token.encode()).hexdigest(), "hub_cache": os.environ.get("HF_HUB_CACHE"),
               "python": sys.executable}}, f)
"""


def hub_copy(model: Path, cache: Path, repo_id: str) -> Path:
    """`model` copied into the hub cache layout: every file a blob named by its sha256, linked from snapshots/<rev>/."""
    import hashlib

    rev = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / path.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """experiment=demo_quick with model.path a repo id found only in a temporary HF_HUB_CACHE (offline), a
    token in a temporary HF_HOME, and a post-checkpoint probe that reports what the trainer's process sees."""
    from sd3exp.demo import ensure_demo_assets
    from tests.helpers import compose_experiment

    root = tmp_path_factory.mktemp("hub")
    cfg = compose_experiment("demo_quick")
    ensure_demo_assets(cfg, with_model=True)
    home = root / "hf-home"
    home.mkdir()
    (home / "token").write_text(FAKE_TOKEN)
    hub_copy(Path(cfg.model.path), home / "hub", "sd3exp-test/tiny-sd3")
    report, probe = root / "probe.json", root / "probe"
    probe.write_text(PROBE.format(report=str(report)))
    probe.chmod(0o755)
    run = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "sd3exp", "experiment=demo_quick", "demo=false",
                          "model.path=sd3exp-test/tiny-sd3", f"concepts.0.path={cfg.concepts[0].path}",
                          f"hydra.run.dir={run}", f"trainer.extra_args=[\"--post_checkpoint_script={probe}\"]"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return run, out, report, home


@needs_trainer
@pytest.mark.slow
def test_demo_trains_and_evaluates_from_a_repo_id_in_the_hub_cache(hub_run):
    run, out, _, home = hub_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"model: sd3exp-test/tiny-sd3: in the Hugging Face cache ({home / 'hub'}" in out.stdout
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert cells and all(c["status"] == "ok" for c in cells), cells
    job = json.loads((run / "eval" / "render-job.json").read_text())
    assert job["base"].startswith(str(home / "hub" / "models--sd3exp-test--tiny-sd3" / "snapshots"))


@needs_trainer
@pytest.mark.slow
def test_the_trainer_sees_the_token_and_no_run_file_or_output_holds_it(hub_run):
    import hashlib

    run, out, report, home = hub_run
    seen = json.loads(report.read_text())
    assert seen["sha256"] == hashlib.sha256(FAKE_TOKEN.encode()).hexdigest(), seen
    assert seen["hub_cache"] == str(home / "hub")
    assert f"Hugging Face token: {home / 'token'}" in out.stdout
    assert FAKE_TOKEN not in out.stdout + out.stderr
    holding = [p for p in run.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert holding == []


def test_eval_device_and_dtype_are_checked_before_rendering():
    from sd3exp.evaluate.stage import check_settings
    from tests.helpers import compose_experiment

    for key, value in (("device", "gpu"), ("dtype", "float8")):
        with pytest.raises(ConfigError, match=f"eval.{key}='{value}': not one of .*Fix: use eval.{key}=auto"):
            check_settings(compose_experiment("demo_quick", [f"eval.{key}={value}"]))
    check_settings(compose_experiment("demo_quick", ["eval.device=cpu", "eval.dtype=fp32"]))


@needs_trainer
def test_training_a_model_not_in_the_cache_offline_stops_before_the_trainer(tmp_path):
    """Through the CLI: the named error, exit 2, and no trainer started (no training folder, no train.log)."""
    from sd3exp.demo import ensure_demo_assets
    from tests.helpers import compose_experiment

    cfg = compose_experiment("demo_quick")
    ensure_demo_assets(cfg, with_model=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", HF_TOKEN=FAKE_TOKEN)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "sd3exp", "experiment=demo_quick", "demo=false", "stage=train",
                          "model.path=stabilityai/stable-diffusion-3-medium-diffusers",
                          f"concepts.0.path={cfg.concepts[0].path}", f"hydra.run.dir={run}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert ("sd3exp: error: model.path='stabilityai/stable-diffusion-3-medium-diffusers': the model cannot be used"
            in out.stderr)
    assert "a token was found in the HF_TOKEN environment variable" in out.stderr
    assert "`hf download stabilityai/stable-diffusion-3-medium-diffusers`" in out.stderr
    assert FAKE_TOKEN not in out.stdout + out.stderr
    assert not (run / "training").exists() and not (run / "train.log").exists()
