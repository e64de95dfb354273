"""Evaluation axes (issue 21 item 1): expansion, checks, names, reuse keys, grid sheets, and the
ComfyUI backend's queued graphs through the CLI and the stand-in server."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sd3exp.errors import ConfigError
from sd3exp.evaluate import axes
from sd3exp.evaluate.cells import Cell, Variant
from sd3exp.evaluate.diffusers_backend import job_variant
from sd3exp.evaluate.grid import sheets, write_grids
from sd3exp.evaluate.reuse import reusable, wanted
from tests.comfy_standin import StandIn
from tests.helpers import run_cli
from tests.test_eval_cli import PROMPTS, fake_lora_run


def ev(**given) -> SimpleNamespace:
    values = {"lora_scales": 1.0, "cfg": 4.5, "steps": 28, "sampler": None, "scheduler": None, "shift": None}
    return SimpleNamespace(**{**values, **given})


def test_a_scalar_is_one_value_and_a_list_is_an_axis():
    values = axes.axis_values(ev(lora_scales=[0.5, 1, 0.5], cfg=[3, 4.5]))
    assert values["lora_scale"] == [0.5, 1.0] and values["cfg"] == [3.0, 4.5] and values["steps"] == [28]
    assert values["sampler"] == [None] and axes.varying(values) == ["lora_scale", "cfg"]


@pytest.mark.parametrize("given, field", [({"cfg": ["high"]}, "eval.cfg"), ({"steps": [20.5]}, "eval.steps"),
                                          ({"lora_scales": []}, "eval.lora_scales"), ({"shift": [0]}, "eval.shift"),
                                          ({"sampler": [3]}, "eval.sampler")])
def test_bad_axis_values_are_refused_naming_the_field(given, field):
    with pytest.raises(ConfigError) as caught:
        axes.axis_values(ev(**given))
    assert caught.value.field == field and "Fix:" in str(caught.value)


def test_diffusers_refuses_a_sampler_without_an_equivalent_and_names_the_supported_ones():
    with pytest.raises(ConfigError) as caught:
        axes.check_diffusers(axes.axis_values(ev(sampler=["euler", "dpmpp_2m"])))
    assert caught.value.value == "dpmpp_2m" and "euler, heun" in str(caught.value)
    with pytest.raises(ConfigError, match="eval.scheduler='sgm_uniform'.*simple, karras"):
        axes.check_diffusers(axes.axis_values(ev(scheduler="sgm_uniform")))
    axes.check_diffusers(axes.axis_values(ev(sampler="euler", scheduler=["simple", "karras"])))


def test_a_diffusers_variant_maps_sampler_scheduler_shift_and_strength():
    [variant] = axes.variants(axes.axis_values(ev(lora_scales=0.5, cfg=3, steps=8, sampler="euler",
                                                  scheduler="karras", shift=3)), lora=True)
    job = job_variant(variant, trained=2.0)
    assert job == {"name": "", "scale": 1.0, "sampling": {"num_inference_steps": 8, "guidance_scale": 3.0},
                   "scheduler": {"class": "FlowMatchEulerDiscreteScheduler",
                                 "options": {"use_karras_sigmas": True, "shift": 3.0}}}
    assert job_variant(axes.variants(axes.axis_values(ev()), lora=False)[0], None)["scheduler"] is None


axis_lists = st.fixed_dictionaries({
    "lora_scales": st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.25]), min_size=1, max_size=4, unique=True),
    "cfg": st.lists(st.sampled_from([1.0, 3.0, 4.5, 7.0]), min_size=1, max_size=3, unique=True),
    "steps": st.lists(st.sampled_from([4, 20, 28]), min_size=1, max_size=3, unique=True),
    "sampler": st.one_of(st.none(), st.lists(st.sampled_from(["euler", "heun"]), min_size=1, unique=True)),
    "shift": st.one_of(st.none(), st.lists(st.sampled_from([1.0, 3.0]), min_size=1, unique=True)),
})


@settings(max_examples=60, deadline=None)
@given(axis_lists)
def test_every_combination_once_with_a_unique_image_name(given):
    values = axes.axis_values(ev(**given))
    lora = axes.variants(values, lora=True)
    assert len(lora) == math.prod(len(v) for v in values.values())
    assert len({v.name for v in lora}) == len(lora) == len({v.axes for v in lora})
    assert (lora[0].name == "") == (not axes.varying(values))
    full = axes.variants(values, lora=False)
    assert len(full) == len(lora) // len(values["lora_scale"]) and all(v.value("lora_scale") is None for v in full)


def test_comfyui_node_inputs_of_a_combination():
    combo = axes.combo_of({"lora_scale": 0.5, "cfg": 3.0, "steps": 20, "sampler": "euler", "shift": 3.0})
    assert axes.NodeInputs(combo, 0.5).lines() == ["LoraLoaderModelOnly strength_model=0.5",
                                                   "KSampler cfg=3 steps=20 sampler_name=euler",
                                                   "ModelSamplingSD3 shift=3"]


def cell(label, variant: Variant, colour=(0, 0, 0), path=None) -> Cell:
    """An ok cell of PROMPTS[0], seed 0: an image file at `path`, else a 64 px square of `colour`."""
    step = int(label.split("-")[1]) if "-" in label else None
    found = Cell(label, step, 0, PROMPTS[0], 0, "ok", variant=variant.name, axes=dict(variant.axes))
    return replace(found, paths=[path]) if path else replace(found, images=[_png(Image.new("RGB", (64, 64), colour))])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_first_varying_axis_is_sub_columns_and_the_rest_are_sheets(tmp_path):
    values = axes.axis_values(ev(lora_scales=[0.5, 1.0], cfg=[3.0, 4.5]))
    cells = [cell("base", v) for v in axes.variants(values, lora=False)]
    cells += [cell(f"checkpoint-{s}", v, (s * 40, 0, 0)) for s in (2, 4) for v in axes.variants(values, lora=True)]
    found = sheets(cells)
    assert [s.title for s in found] == ["CFG: 3", "CFG: 4.5"]
    assert [c.title for c in found[0].columns] == ["base model", "step 2\nStrength: 0.5", "step 2\nStrength: 1",
                                                   "step 4\nStrength: 0.5", "step 4\nStrength: 1"]
    assert [c.variant for c in found[1].columns] == ["_cfg4.5", "_x0.5_cfg4.5", "_x1_cfg4.5", "_x0.5_cfg4.5",
                                                     "_x1_cfg4.5"]
    (tmp_path / "grid.png").write_bytes(b"stale")
    paths = write_grids(cells, tmp_path, best="checkpoint-4", best_variant="_x1_cfg4.5")
    assert [p.name for p in paths] == ["grid-sheet1.png", "grid-sheet2.png"] and not (tmp_path / "grid.png").exists()
    first, second = (Image.open(p).convert("RGB") for p in paths)
    assert first.size == second.size and first.width > 5 * 128
    green = (23, 150, 60)
    assert green not in {first.getpixel((first.width - 2, y)) for y in range(first.height)}
    assert green in {second.getpixel((second.width - 2, y)) for y in range(second.height)}


def test_one_axis_keeps_one_grid_with_labelled_sub_columns(tmp_path):
    values = axes.axis_values(ev(cfg=[3.0, 4.5]))
    cells = [cell("checkpoint-2", v) for v in axes.variants(values, lora=True)]
    assert [[c.title for c in s.columns] for s in sheets(cells)] == [["step 2\nCFG: 3", "step 2\nCFG: 4.5"]]
    assert [p.name for p in write_grids(cells, tmp_path)] == ["grid.png"]


def test_a_cell_is_reused_under_its_new_variant_name_when_an_axis_grows(tmp_path):
    before = axes.variants(axes.axis_values(ev(lora_scales=[0.5, 1.0])), lora=True)
    image = tmp_path / "old.png"
    image.write_bytes(b"png")
    old = [cell("checkpoint-2", v, path=image) for v in before]
    record = {"settings": {}, "checkpoints": {"checkpoint-2": ["w", 1]}}
    after = {"checkpoint-2": axes.variants(axes.axis_values(ev(lora_scales=[0.5, 1.0], cfg=[4.5, 6.0])), lora=True)}
    found = reusable(old, record, record, PROMPTS[:1], [0], after)
    assert sorted(found) == [("checkpoint-2", 0, 0, "_x0.5_cfg4.5"), ("checkpoint-2", 0, 0, "_x1_cfg4.5")]
    assert len(wanted(["checkpoint-2"], PROMPTS[:1], [0], after)) == 4


def saved_graph(path: Path) -> dict:
    return json.loads(Image.open(path).text["prompt"])


def node_input(graph: dict, class_type: str, name: str):
    return next(n["inputs"][name] for n in graph.values() if n["class_type"] == class_type)


def test_comfyui_queues_every_strength_and_cfg(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        common = ["experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16",
                  f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}", f"eval.models_dir={models}",
                  "eval.include_final=false", f"eval.prompts={json.dumps(PROMPTS[:1])}", "eval.cfg=[3.0,4.5]"]
        out = run_cli(*common, "eval.lora_scales=[0.5,1.0]")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        cells = json.loads((run / "eval" / "cells.json").read_text())
        queued = {(c["label"], node_input(g, "LoraLoaderModelOnly", "strength_model"), node_input(g, "KSampler", "cfg"))
                  for c in cells for g in [saved_graph(run / "eval" / c["paths"][0])]}
        assert queued == {(f"checkpoint-{s}", x, cfg) for s in (2, 4) for x in (0.5, 1.0) for cfg in (3.0, 4.5)}
        assert {(c["axes"]["lora_scale"], c["axes"]["cfg"], c["lora_scale"]) for c in cells} == \
            {(x, cfg, x) for x in (0.5, 1.0) for cfg in (3.0, 4.5)}
        assert sorted(p.name for p in (run / "eval").glob("grid*.png")) == ["grid-sheet1.png", "grid-sheet2.png"]
        again = run_cli(*common, "eval.lora_scales=[0.5,1.0,1.25]")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "reused 8 unchanged cell(s)" in again.stderr + again.stdout
    cells = json.loads((run / "eval" / "cells.json").read_text())
    fresh = [c for c in cells if c["axes"]["lora_scale"] == 1.25]
    assert len(cells) == 12 and len(fresh) == 4
    assert {node_input(saved_graph(run / "eval" / c["paths"][0]), "LoraLoaderModelOnly", "strength_model")
            for c in fresh} == {1.25}


def test_comfyui_shift_needs_a_model_sampling_node(tmp_path):
    run = tmp_path / "run"
    fake_lora_run(run, steps=(2,))
    out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                  "eval.backend=comfyui", "eval.url=http://127.0.0.1:9", "eval.include_final=false",
                  "eval.shift=[1.0,3.0]")
    assert out.returncode != 0
    assert "eval.shift=1: the workflow has 0 ModelSamplingSD3 nodes" in out.stderr


def test_plan_refuses_a_sampler_diffusers_has_no_equivalent_for(tmp_path):
    out = run_cli("experiment=demo_quick", "stage=plan", "demo=false", "concepts.0.num_images=16",
                  f"hydra.run.dir={tmp_path / 'run'}", "eval.sampler=[euler,dpmpp_2m_sde]")
    assert out.returncode != 0 and not (tmp_path / "run").exists()
    assert "eval.sampler='dpmpp_2m_sde': has no diffusers equivalent; the diffusers backend supports euler, heun" \
        in out.stderr


def test_a_changed_axis_value_is_a_changed_request():
    """One CFG for another is no "already evaluated": the cells at the old value are not the ones asked for."""
    from sd3exp.evaluate.stage import request_record
    from tests.helpers import compose_experiment

    records = [request_record(compose_experiment("demo_quick", [f"eval.cfg={cfg}"]), []) for cfg in (3.0, 4.5)]
    assert records[0]["settings"] == records[1]["settings"] and records[0] != records[1]
    assert records[1]["axes"]["cfg"] == [4.5]
