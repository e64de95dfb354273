"""Evaluation axes end to end (issue 21 item 1): a real demo_quick LoRA rendered by diffusers at two
strengths x two CFG values, then once more with a third strength (only the new cells rendered)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import needs_trainer, run_cli

pytestmark = [needs_trainer, pytest.mark.slow, pytest.mark.timeout(3600)]  # train + 2 evaluations
PROMPT = ["k4s4, red circle, blue background"]
COMBOS = {(0.5, 3.0), (0.5, 4.5), (1.0, 3.0), (1.0, 4.5)}


def evaluate(run: Path, scales: str) -> "subprocess.CompletedProcess":
    return run_cli("experiment=demo_quick", "stage=eval", f"hydra.run.dir={run}", f"eval.lora_scales={scales}",
                   "eval.cfg=[3.0,4.5]", f"eval.prompts={json.dumps(PROMPT)}", "eval.max_step=4",
                   "eval.include_final=false", timeout=3600)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """demo_quick trained once, evaluated at eval.lora_scales=[0.5,1.0] eval.cfg=[3.0,4.5]."""
    run = tmp_path_factory.mktemp("axes") / "run"
    out = run_cli("experiment=demo_quick", "stage=train", f"hydra.run.dir={run}", timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = evaluate(run, "[0.5,1.0]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run, out


def cells_of(run: Path) -> list:
    return json.loads((run / "eval" / "cells.json").read_text())


def test_cells_json_has_every_combination_for_every_checkpoint(evaluated):
    run, _ = evaluated
    cells = cells_of(run)
    labels = list(dict.fromkeys(c["label"] for c in cells))
    assert len(labels) >= 2 and all(c["status"] == "ok" for c in cells)
    for label in labels:
        mine = [c for c in cells if c["label"] == label]
        assert {(c["axes"]["lora_scale"], c["axes"]["cfg"]) for c in mine} == COMBOS
        assert all(c["axes"]["steps"] == 4 and c["lora_scale"] == c["axes"]["lora_scale"] for c in mine)  # alpha/rank 1
    images = {Path(c["paths"][0]).name for c in cells}
    assert len(images) == len(cells) and f"{labels[0]}_x0.5_cfg3_p0_s0.png" in images


def test_grid_has_a_sheet_per_cfg_with_strength_sub_columns(evaluated):
    run, _ = evaluated
    cells = cells_of(run)
    sheets = sorted((run / "eval").glob("grid*.png"))
    assert [p.name for p in sheets] == ["grid-sheet1.png", "grid-sheet2.png"]
    checkpoints = len({c["label"] for c in cells})
    widths = {Image.open(p).size for p in sheets}
    assert len(widths) == 1  # both sheets: every checkpoint x 2 strengths, one row, under a title band
    report = (run / "eval" / "report.html").read_text()
    assert "grid-sheet1.png" in report and "grid-sheet2.png" in report
    assert checkpoints * 2 == sum(1 for c in cells if c["axes"]["cfg"] == 3.0)


def test_best_json_names_a_combination_with_its_comfyui_inputs(evaluated):
    run, out = evaluated
    best = json.loads((run / "eval" / "best.json").read_text())["best"]
    assert (best["axes"]["lora_scale"], best["axes"]["cfg"]) in COMBOS
    assert best["comfyui"][0] == f"LoraLoaderModelOnly strength_model={best['axes']['lora_scale']:g}"
    assert best["comfyui"][1] == f"KSampler cfg={best['axes']['cfg']:g} steps=4"
    # the last `best checkpoint:` line (the trackers' lines may follow it, sd3exp/tracking/)
    summary = [line for line in out.stdout.strip().splitlines() if line.startswith("best checkpoint: ")][-1]
    assert summary.startswith("best checkpoint: ") and summary.endswith(
        f"; at Strength: {best['axes']['lora_scale']:g}, CFG: {best['axes']['cfg']:g}, Steps: 4; ComfyUI: "
        f"{best['comfyui'][0]}; {best['comfyui'][1]}"), summary
    shown = run_cli("best", str(run))
    assert shown.returncode == 0, shown.stderr
    assert f"lora_scale={best['axes']['lora_scale']:g}" in shown.stderr + shown.stdout
    assert "KSampler cfg=" in shown.stderr + shown.stdout


def test_one_more_strength_renders_only_the_new_cells(evaluated):
    run, _ = evaluated
    before = {(c["label"], c["axes"]["lora_scale"], c["axes"]["cfg"]): run / "eval" / c["paths"][0]
              for c in cells_of(run)}
    inodes = {key: path.stat().st_ino for key, path in before.items()}
    out = evaluate(run, "[0.5,1.0,1.25]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"reused {len(before)} unchanged cell(s)" in out.stderr + out.stdout
    job = json.loads((run / "eval" / "render-job.json").read_text())
    skip = {tuple(s) for s in job["skip"]}
    rendered = [(c["label"], v["name"]) for c in job["checkpoints"] for v in c["variants"]
                for s in job["seeds"] for i in range(len(job["prompts"])) if (c["label"], i, s, v["name"]) not in skip]
    labels = {label for label, _, _ in before}
    assert sorted(rendered) == sorted((label, f"_x1.25_cfg{cfg:g}") for label in labels for cfg in (3.0, 4.5))
    after = cells_of(run)
    assert len(after) == len(before) * 3 // 2
    for c in after:  # the reused images are the same files (hard links), not renders of their own
        key = (c["label"], c["axes"]["lora_scale"], c["axes"]["cfg"])
        if key in inodes:
            assert (run / "eval" / c["paths"][0]).stat().st_ino == inodes[key]
