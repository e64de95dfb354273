"""GPU memory and disk estimates (sd3exp/estimate.py), memory and SD3.5 model presets (issue 19)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd3exp import estimate
from sd3exp.estimate import GB, GIB, PUBLISHED
from sd3exp.project import CONF_DIR
from tests.helpers import compose_experiment, needs_trainer, run_cli, trainer_python

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
TINY = {"attention_head_dim": 64, "caption_projection_dim": 128, "dual_attention_layers": [], "in_channels": 16,
        "joint_attention_dim": 4096, "num_attention_heads": 2, "num_layers": 2, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 32, "qk_norm": None, "sample_size": 32}


@pytest.fixture(scope="module")
def fantasy():
    return compose_experiment("fantasy_art")


@pytest.fixture(scope="module")
def fantasy_lora():
    return compose_experiment("fantasy_art_lora")


@pytest.mark.parametrize("config, count", [
    (PUBLISHED[SD3_MEDIUM], 2_028_328_000),  # the issue's figure
    (PUBLISHED["stabilityai/stable-diffusion-3.5-medium"], 2_243_171_520),  # diffusers, meta device
    (PUBLISHED["stabilityai/stable-diffusion-3.5-large"], 8_056_627_520),
    (TINY, 1_875_264),  # models/tiny-sd3's transformer, counted with torch
])
def test_parameter_count_matches_diffusers(config, count):
    assert estimate.transformer_parameters(config) == count


def test_fantasy_art_matches_the_issue_arithmetic(fantasy):
    """Weights 4.06 GB + gradients 4.06 + AdamWBF16 state 12.17 + checkpointed activations ~3.6;
    each checkpoint ~16 GB, 30 kept ~490 GB."""
    est = estimate.estimate(fantasy, 30)
    m, d = est.gpu_memory_gib, est.disk_gib
    assert m.weights * GIB / GB == pytest.approx(4.06, abs=0.01)
    assert m.gradients * GIB / GB == pytest.approx(4.06, abs=0.01)
    assert m.optimizer * GIB / GB == pytest.approx(12.17, abs=0.01)
    assert m.activations * GIB / GB == pytest.approx(3.6, rel=0.05)
    assert 18 <= m.total <= 30
    assert m.total == pytest.approx(m.weights + m.gradients + m.optimizer + m.activations, abs=0.02)
    assert d.per_checkpoint * GIB / GB == pytest.approx(16.2, abs=0.1)
    assert d.total * GIB / GB == pytest.approx(490, rel=0.01)


def test_no_gradient_checkpointing_needs_about_60_gb(fantasy):
    est = estimate.estimate(replace(fantasy, training=replace(fantasy.training, gradient_checkpointing=False)), 30)
    assert est.gpu_memory_gib.total * GIB / GB == pytest.approx(60, rel=0.05)


def test_lora_needs_about_8_6_gb(fantasy_lora):
    est = estimate.estimate(fantasy_lora, 30)
    assert 7.5 <= est.gpu_memory_gib.total * GIB / GB <= 9.5
    assert est.trained_parameters == 24 * 4 * 16 * 2 * 1536  # to_q/k/v/out.0 of 24 blocks, rank 16
    assert est.disk_gib.per_checkpoint < 0.2


def test_unknown_model_gives_no_estimate(fantasy):
    assert estimate.estimate(replace(fantasy, model=replace(fantasy.model, path="someone/unknown-model")), 30) is None


def test_local_model_config_is_read(tmp_path, fantasy):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(TINY))
    est = estimate.estimate(replace(fantasy, model=replace(fantasy.model, path=str(tmp_path))), 1)
    assert est.parameters == 1_875_264


def test_hub_cache_config_is_read(tmp_path, monkeypatch, fantasy):
    snap = tmp_path / "models--someone--small-sd3" / "snapshots" / "abc123" / "transformer"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    est = estimate.estimate(replace(fantasy, model=replace(fantasy.model, path="someone/small-sd3")), 1)
    assert est.parameters == 1_875_264


@settings(max_examples=40, deadline=None)
@given(b1=st.integers(1, 32), b2=st.integers(1, 32), res=st.sampled_from([512, 768, 1024, 1536]),
       ckpt=st.booleans())
def test_memory_grows_with_batch(fantasy, b1, b2, res, ckpt):
    def total(batch: int) -> float:
        t = replace(fantasy.training, batch_size=batch, gradient_checkpointing=ckpt)
        return estimate.estimate(replace(fantasy, training=t, dataset=replace(fantasy.dataset, resolution=res)),
                                 1).gpu_memory_gib.total
    lo, hi = sorted((b1, b2))
    assert total(lo) <= total(hi)


@settings(max_examples=40, deadline=None)
@given(r1=st.integers(1, 256), r2=st.integers(1, 256), kept=st.integers(0, 100))
def test_lora_memory_and_disk_grow_with_rank(fantasy_lora, r1, r2, kept):
    def est(rank: int) -> estimate.Estimate:
        return estimate.estimate(replace(fantasy_lora, lora=replace(fantasy_lora.lora, rank=rank)), kept)
    lo, hi = sorted((r1, r2))
    assert est(lo).trained_parameters <= est(hi).trained_parameters
    assert est(lo).gpu_memory_gib.total <= est(hi).gpu_memory_gib.total
    assert est(lo).disk_gib.total <= est(hi).disk_gib.total


@settings(max_examples=30, deadline=None)
@given(res=st.sampled_from([512, 768, 1024, 1536]), batch=st.integers(1, 16))
def test_checkpointing_and_8bit_state_never_cost_memory(fantasy, res, batch):
    cfg = replace(fantasy, training=replace(fantasy.training, batch_size=batch),
                  dataset=replace(fantasy.dataset, resolution=res))
    base = estimate.estimate(cfg, 1).gpu_memory_gib
    off = estimate.estimate(replace(cfg, training=replace(cfg.training, gradient_checkpointing=False)), 1)
    eight = estimate.estimate(replace(cfg, optimizer=replace(cfg.optimizer, name="sdnq-adamw")), 1)
    assert off.gpu_memory_gib.activations > base.activations
    assert eight.gpu_memory_gib.optimizer < base.optimizer


@settings(max_examples=30, deadline=None)
@given(k1=st.integers(0, 200), k2=st.integers(0, 200))
def test_disk_grows_with_kept_checkpoints(fantasy, k1, k2):
    lo, hi = sorted((k1, k2))
    assert estimate.estimate(fantasy, lo).disk_gib.total <= estimate.estimate(fantasy, hi).disk_gib.total


@pytest.mark.parametrize("preset", ["12gb", "16gb", "24gb", "48gb", "80gb"])
def test_each_memory_preset_fits_a_sd3_medium_lora(preset):
    cfg = compose_experiment("fantasy_art_lora", [f"memory={preset}"])
    assert estimate.estimate(cfg, 30).gpu_memory_gib.total <= cfg.training.gpu_memory_gib


def test_quantised_base_is_lora_only():
    assert compose_experiment("fantasy_art", ["memory=24gb"]).model.base_precision == "no_change"
    assert compose_experiment("fantasy_art_lora", ["memory=24gb"]).model.base_precision == "int8-quanto"
    assert compose_experiment("fantasy_art_lora", ["memory=12gb"]).model.base_precision == "int4-quanto"


def test_over_budget_warning_names_the_gap_and_the_preset_that_fits(fantasy):
    cfg = replace(fantasy, training=replace(fantasy.training, gpu_memory_gib=16.0))
    [warning] = estimate.memory_warnings(cfg, CONF_DIR, 30)
    assert "6.23 GiB over training.gpu_memory_gib=16" in warning and "memory=16gb" in warning


def compile_to(run_dir: Path, *overrides: str):
    return run_cli(*overrides, "stage=compile", f"hydra.run.dir={run_dir}", timeout=300)


def settings_of(run_dir: Path) -> list:
    """config.env's settings (its comment header names the overrides and the config hash)."""
    lines = (run_dir / "config" / "config.env").read_text().splitlines()
    return [ln for ln in lines if not ln.startswith("#")]


def test_memory_24gb_fits_and_changes_only_the_optimizer(tmp_path):
    assert compile_to(tmp_path / "plain", "experiment=fantasy_art").returncode == 0
    out = compile_to(tmp_path / "24gb", "experiment=fantasy_art", "memory=24gb")
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "24gb" / "plan.json").read_text())
    assert plan["estimate"]["gpu_memory_gib"]["total"] <= 24
    assert "GPU memory (est)" in out.stdout + out.stderr
    before, after = settings_of(tmp_path / "plain"), settings_of(tmp_path / "24gb")
    assert sorted(set(before) ^ set(after)) == ["OPTIMIZER=adamw_bf16", "OPTIMIZER=sdnq-adamw"]
    backends = (tmp_path / "24gb" / "config" / "multibackend.json").read_text()
    assert (tmp_path / "plain" / "config" / "multibackend.json").read_text() == \
        backends.replace(str(tmp_path / "24gb"), str(tmp_path / "plain"))


def test_plan_warns_when_kept_checkpoints_exceed_the_free_disk(tmp_path):
    """2382 checkpoints of ~15 GiB, all kept: ~35 TiB, more than any disk here."""
    out = run_cli("experiment=fantasy_art", "stage=plan", "checkpointing.round_to=null",
                  "checkpointing.every_steps=10", "checkpointing.keep=0", f"paths.output_root={tmp_path}", timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "2382 kept checkpoint(s) x 15.11 GiB" in text and "GiB are free at" in text
    assert "checkpointing.keep=" in text and "hydra.run.dir=" in text


SD35 = [(m, t) for m in ("sd35_medium", "sd35_large") for t in ("full", "lora")]


@pytest.mark.parametrize("model, kind", SD35)
def test_sd35_presets_compile_with_their_flavour(tmp_path, model, kind):
    out = compile_to(tmp_path, "experiment=fantasy_art", f"model={model}", f"model.type={kind}")
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "config" / "config.json").read_text())
    assert cfg["model_flavour"] == model.split("_")[1] and "stable-diffusion-3.5" in cfg["pretrained_model_name_or_path"]
    assert json.loads((tmp_path / "plan.json").read_text())["estimate"]["parameters"] > 2e9


# Every model preset, full and LoRA, and each preset's arguments with each model preset: 12gb (int4
# base, SDNQ, batch 1 x 6, 768 px) and 16gb (int8 base, SDNQ, batch 2 x 3) hold every argument 24gb
# compiles; 48gb and 80gb compile none the default lacks.
PREFLIGHT = [("sd35_medium", "full", "16gb"), ("sd35_medium", "lora", "12gb"), ("sd35_medium", "lora", "none"),
             ("sd35_large", "full", "12gb"), ("sd35_large", "lora", "16gb"), ("sd35_large", "full", "none"),
             ("sd3_medium", "lora", "12gb"), ("sd3_medium", "lora", "16gb"), ("sd3_medium", "full", "16gb")]


@pytest.fixture(scope="module")
def preflight_matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each PREFLIGHT case compiled, and all parsed by SimpleTuner in one trainer process."""
    from sd3exp import preflight
    from sd3exp.trainer_env import TrainerEnv

    runs = {}
    for model, kind, memory in PREFLIGHT:
        run = tmp_path_factory.mktemp("preflight") / "run"
        extra = [] if memory == "none" else [f"memory={memory}"]
        out = compile_to(run, "experiment=fantasy_art", f"model={model}", f"model.type={kind}", *extra)
        assert out.returncode == 0, out.stderr
        runs[model, kind, memory] = run
    python = trainer_python()
    results = preflight.run_parsers(TrainerEnv("managed", python.parent.parent, python, "4.10.1"), list(runs.values()))
    return {case: (run, result) for (case, run), result in zip(runs.items(), results)}


@needs_trainer
@pytest.mark.parametrize("model, kind, memory", PREFLIGHT)
def test_simpletuner_accepts_model_and_memory_presets(preflight_matrix, model, kind, memory):
    run, result = preflight_matrix[model, kind, memory]
    assert result["ok"], result.get("error")
    assert result["run"] == str(run)
    assert result["args"]["model_flavour"] == {"sd35_medium": "medium", "sd35_large": "large"}.get(model)


def test_a_changed_estimate_is_not_a_changed_dataset(tmp_path):
    """plan.json written while the model's shape was unknown (estimate null; the trainer fills the hub
    cache later) is the same plan: resuming must not be refused as 'the dataset changed'."""
    from sd3exp.io import write_json
    from sd3exp.job import build, compose_job
    from sd3exp.pipeline import plan_change

    run = tmp_path / "run"
    assert compile_to(run, "experiment=fantasy_art").returncode == 0
    written = json.loads((run / "plan.json").read_text())
    write_json(run / "plan.json", {**written, "estimate": None})
    plan, _ = build(compose_job(CONF_DIR, ["experiment=fantasy_art"], run))
    assert plan.estimate is not None
    assert plan_change(run, plan) is None
