"""The diffusers backend: job file, progress stream, crashes; end to end on the tiny SD3 model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from sd3exp.errors import EvalError
from sd3exp.evaluate import diffusers_backend as backend
from sd3exp.evaluate.cells import BASE_LABEL, Sampling, SweepInterrupted, write_cells_json
from sd3exp.evaluate.checkpoints import Checkpoint, discover
from sd3exp.evaluate.grid import write_grids
from sd3exp.evaluate.report import write_report
from sd3exp.tinymodel import OFFLINE_ENV, build_tiny_model
from tests.helpers import needs_trainer, trainer_python

PROMPTS = ["a cat", "a <b>dog</b>"]
SAMPLING = Sampling(steps=2, cfg=4.0, width=64, height=64)
FAKE_CHECKPOINTS = """
import sys, torch
from pathlib import Path
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
for step in (100, 200):
    g = torch.Generator().manual_seed(step)
    path = out / "training" / f"checkpoint-{step}" / "transformer" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}, path)
bad = out / "training" / "checkpoint-300" / "transformer" / "diffusion_pytorch_model.safetensors"
bad.parent.mkdir(parents=True)
bad.write_bytes(b"not a safetensors file")
transformer = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer")
transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
with torch.no_grad():
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
StableDiffusion3Pipeline.save_lora_weights(out / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
# rank 4, alpha 8 as SimpleTuner 4.10.1 saves it: alpha in checkpoint-N's metadata only, the final file bare
transformer.delete_adapters("default")
transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
with torch.no_grad():
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
layers = get_peft_model_state_dict(transformer)
StableDiffusion3Pipeline.save_lora_weights(out / "alpha8" / "checkpoint-2", transformer_lora_layers=layers,
                                           transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
save_file({"transformer." + k: v.contiguous() for k, v in layers.items()},
          out / "alpha8" / "pytorch_lora_weights.safetensors")
"""


def checkpoint(label: str, kind: str = "full") -> Checkpoint:
    return Checkpoint(None, label, kind, Path(f"/x/{label}.safetensors"))


def test_job_lists_base_first_and_maps_sampling(tmp_path):
    job = backend.make_job(tmp_path / "base", [checkpoint("final")], PROMPTS, [3], tmp_path / "images",
                           Sampling(steps=4, cfg=5.0, negative_prompt="blurry"), include_base=True)
    assert [(c["label"], c["kind"]) for c in job["checkpoints"]] == [(BASE_LABEL, "base"), ("final", "full")]
    assert job["sampling"] == {"num_inference_steps": 4, "guidance_scale": 5.0, "negative_prompt": "blurry"}
    assert job["image_name"].format(label="final", variant="", prompt_index=1, seed=3, suffix="") == "final_p1_s3.png"
    assert json.loads(json.dumps(job)) == job


def test_parse_line_and_planned_cells(tmp_path):
    job = backend.make_job(tmp_path, [checkpoint("a"), checkpoint("b")], PROMPTS, [0, 1], tmp_path)
    planned = backend.planned_cells(job)
    assert [(c.label, c.prompt_index, c.seed) for c in planned][:3] == [("a", 0, 0), ("a", 0, 1), ("a", 1, 0)]
    assert len(planned) == 8 and all(c.status == "error" for c in planned)
    line = {"label": "b", "step": None, "prompt_index": 1, "seed": 1, "status": "ok", "path": "/i/b.png",
            "error": "", "seconds": 0.5}
    cell = backend.parse_line(json.dumps(line), job)
    assert (cell.prompt, cell.status, cell.paths, cell.seconds) == (PROMPTS[1], "ok", [Path("/i/b.png")], 0.5)
    assert backend.parse_line("Loading pipeline components...", job) is None


def fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in interpreter: a shell script that ignores its arguments."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_worker_crash_keeps_every_cell(tmp_path):
    line = {"label": "a", "step": None, "prompt_index": 0, "seed": 0, "status": "ok", "path": "/i/a.png",
            "error": "", "seconds": 1.0}
    python = fake_python(tmp_path, f"echo '{json.dumps(line)}'\necho 'Segmentation fault' >&2\nexit 139\n")
    cells = backend.render_cells(tmp_path / "base", [checkpoint("a"), checkpoint("b")], PROMPTS, [0],
                                 tmp_path / "eval" / "images", python, progress=False)
    assert [c.status for c in cells] == ["ok", "error", "error", "error"]
    assert "exited with code 139" in cells[1].error and "Segmentation fault" in cells[1].error
    assert json.loads((tmp_path / "eval" / "render-job.json").read_text())["prompts"] == PROMPTS


def test_worker_timeout(tmp_path):
    python = fake_python(tmp_path, "exec sleep 30\n")
    cells = backend.render_cells(tmp_path, [checkpoint("a")], ["p"], [0], tmp_path / "images", python, timeout_s=0.5,
                                 progress=False)
    assert len(cells) == 1 and "timeout" in cells[0].error


def test_missing_trainer_python(tmp_path):
    with pytest.raises(EvalError, match="trainer python"):
        backend.render_cells(tmp_path, [checkpoint("a")], ["p"], [0], tmp_path / "images", tmp_path / "nope")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline, two perturbed full checkpoints, a corrupt one and a LoRA."""
    python = trainer_python()
    root = tmp_path_factory.mktemp("diffusers")
    build_tiny_model(root / "tiny", python, seed=0, vae_steps=0)  # a random VAE is enough here
    subprocess.run([str(python), "-c", FAKE_CHECKPOINTS, str(root / "tiny"), str(root)], check=True,
                   env={**os.environ, **OFFLINE_ENV}, capture_output=True, timeout=300)
    return root


def same(a: Path, b: Path) -> bool:
    return ImageChops.difference(Image.open(a).convert("RGB"), Image.open(b).convert("RGB")).getbbox() is None


@pytest.mark.slow
@needs_trainer
def test_end_to_end_on_the_tiny_model(tiny_run):
    found = discover(tiny_run / "training", include_final=False).checkpoints
    lora = Checkpoint(None, "lora", "lora", tiny_run / "lora" / "pytorch_lora_weights.safetensors")
    run = tiny_run / "run"
    cells = backend.render_cells(tiny_run / "tiny", found + [lora], PROMPTS, [7], run / "eval" / "images",
                                 trainer_python(), SAMPLING, include_base=True, timeout_s=600, progress=False)

    assert [(c.label, c.prompt_index) for c in cells] == [
        (label, i) for label in ("base", "checkpoint-100", "checkpoint-200", "checkpoint-300", "lora") for i in (0, 1)
    ]
    by_label = {label: [c for c in cells if c.label == label] for label in ("base", "checkpoint-100", "lora")}
    ok = [c for c in cells if c.status == "ok"]
    assert len(ok) == 8 and all(Image.open(c.paths[0]).size == (64, 64) for c in ok)
    full_pngs = sorted((run / "eval" / "images").glob("checkpoint-*.png"))
    assert [p.name for p in full_pngs] == [f"checkpoint-{s}_p{i}_s7.png" for s in (100, 200) for i in (0, 1)]
    failed = [c for c in cells if c.label == "checkpoint-300"]
    assert all(c.status == "error" and "SafetensorError" in c.error and not c.paths for c in failed)
    assert [c.step for c in cells[::2]] == [None, 100, 200, 300, None]
    assert all(c.prompt == PROMPTS[c.prompt_index] and c.seconds > 0 for c in ok)
    base_image, full_image, lora_image = (by_label[k][0].paths[0] for k in ("base", "checkpoint-100", "lora"))
    assert not same(base_image, full_image) and not same(base_image, lora_image)

    grids = write_grids(cells, run / "eval")
    write_cells_json(cells, run / "eval" / "cells.json")
    report = write_report(run, cells, grids)
    assert "SafetensorError" in report.read_text() and grids == [run / "eval" / "grid.png"]


@pytest.mark.slow
@needs_trainer
def test_skipped_cells_are_left_out(tiny_run):
    """What eval reuses from the last evaluation is not rendered again."""
    found = discover(tiny_run / "training", include_final=False).checkpoints[:2]
    images = tiny_run / "skip" / "images"
    skip = {("base", 0, 7, ""), ("base", 1, 7, ""), ("checkpoint-100", 1, 7, "")}
    cells = backend.render_cells(tiny_run / "tiny", found, PROMPTS, [7], images, trainer_python(), SAMPLING,
                                 include_base=True, timeout_s=600, progress=False, skip=skip)
    assert [(c.label, c.prompt_index, c.status) for c in cells] == [
        ("checkpoint-100", 0, "ok"), ("checkpoint-200", 0, "ok"), ("checkpoint-200", 1, "ok")]
    assert sorted(p.name for p in images.iterdir()) == ["checkpoint-100_p0_s7.png", "checkpoint-200_p0_s7.png",
                                                        "checkpoint-200_p1_s7.png"]


@pytest.mark.slow
@needs_trainer
def test_lora_checkpoint_and_final_render_alike_at_the_trained_scale(tiny_run):
    """rank 4, alpha 8: diffusers read alpha from checkpoint-N's metadata (scale 2) but not from the
    final file (scale 1); with the scale made explicit both render at 2, which differs from 1."""
    from sd3exp.evaluate.lora_scale import strengths

    folder = tiny_run / "alpha8"
    loras = [Checkpoint(2, "checkpoint-2", "lora", folder / "checkpoint-2" / "pytorch_lora_weights.safetensors"),
             Checkpoint(None, "final", "lora", folder / "pytorch_lora_weights.safetensors")]
    found, _ = strengths(loras, rank=4, alpha=8)
    scales = {label: s.trained for label, s in found.items()}
    assert scales == {"checkpoint-2": 2.0, "final": 2.0}
    cells = backend.render_cells(tiny_run / "tiny", loras, PROMPTS[:1], [7], folder / "eval" / "images",
                                 trainer_python(), SAMPLING, timeout_s=600, progress=False, scales=scales)
    at_one = backend.render_cells(tiny_run / "tiny", loras[1:], PROMPTS[:1], [7], folder / "one" / "images",
                                  trainer_python(), SAMPLING, timeout_s=600, progress=False, scales={"final": 1.0})
    assert [c.status for c in cells + at_one] == ["ok"] * 3, [c.error for c in cells + at_one]
    assert same(cells[0].paths[0], cells[1].paths[0])
    assert not same(cells[1].paths[0], at_one[0].paths[0])


def test_ctrl_c_stops_the_worker_and_keeps_the_cells_it_reported(tmp_path):
    line = {"label": "a", "step": None, "prompt_index": 0, "seed": 0, "status": "ok", "path": "/i/a.png",
            "error": "", "seconds": 1.0}
    python = fake_python(tmp_path, f"echo '{json.dumps(line)}'\nexec sleep 30\n")
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C
    started = time.monotonic()
    # the OS may hand a process's signal to any of its threads: here never to the main one
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with pytest.raises(SweepInterrupted) as stop:
            backend.render_cells(tmp_path, [checkpoint("a")], PROMPTS, [0], tmp_path / "images", python, progress=False)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    assert [(c.label, c.prompt_index, c.status) for c in stop.value.cells] == [("a", 0, "ok")]
    assert stop.value.signum == signal.SIGINT and time.monotonic() - started < 10


def test_axes_render_each_strength_sampler_scheduler_and_shift(tiny_run):
    """Every variant is rendered with its own settings: a LoRA at two strengths differs, and so do heun,
    karras sigmas and another shift from the plain euler render; the same variant twice is identical."""
    from sd3exp.evaluate import axes

    lora = Checkpoint(None, "lora", "lora", tiny_run / "lora" / "pytorch_lora_weights.safetensors")
    ev = {"lora_scales": [0.5, 1.0], "cfg": 4.0, "steps": 2, "sampler": None, "scheduler": None, "shift": None}
    strengths = axes.variants(axes.axis_values(type("Ev", (), ev)), lora=True)
    samplers = [axes.Variant(name, axes.combo_of(values)) for name, values in (
        ("_euler", {"sampler": "euler", "steps": 3}), ("_euler2", {"sampler": "euler", "steps": 3}),
        ("_heun", {"sampler": "heun", "steps": 3}), ("_karras", {"sampler": "euler", "scheduler": "karras", "steps": 3}),
        ("_shift1", {"sampler": "euler", "shift": 1.0, "steps": 3}))]  # 3: 2 karras sigmas are euler's
    images = tiny_run / "axes" / "images"
    cells = backend.render_cells(tiny_run / "tiny", [lora], PROMPTS[:1], [7], images, trainer_python(),
                                 SAMPLING, include_base=True, timeout_s=600, progress=False,
                                 variants={"lora": strengths, BASE_LABEL: samplers})
    assert [(c.label, c.variant, c.status) for c in cells] == [(BASE_LABEL, v.name, "ok") for v in samplers] + \
        [("lora", v.name, "ok") for v in strengths], [c.error for c in cells]
    path = {(c.label, c.variant): c.paths[0] for c in cells}
    assert path[("lora", "_x0.5")].name == "lora_x0.5_p0_s7.png"
    assert not same(path[("lora", "_x0.5")], path[("lora", "_x1")])
    assert same(path[(BASE_LABEL, "_euler")], path[(BASE_LABEL, "_euler2")])
    for other in ("_heun", "_karras", "_shift1"):
        assert not same(path[(BASE_LABEL, "_euler")], path[(BASE_LABEL, other)]), other
