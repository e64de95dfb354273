"""`stage=eval eval.backend=comfyui` through the CLI, against the stand-in ComfyUI server."""

from __future__ import annotations

import json
import random
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.evaluate.comfyui import ComfyClient, SweepSpec, find_nodes, load_workflow, run_sweep
from sd3exp.project import ROOT
from sd3exp.runfolder import exclusive
from tests.comfy_standin import StandIn, save_safetensors
from tests.helpers import compose_experiment, run_cli

PROMPTS = ["k4s4, red circle", "k4s4, blue square"]
LORA_WORKFLOW = Path(__file__).parent.parent / "conf/workflows/sd3_lora_api.json"


def lora_tensors(seed: int, rank: int = 4, width: int = 8) -> dict:
    """One attention projection's lora_A/lora_B in SimpleTuner's (diffusers) key names."""
    rng = random.Random(seed)
    key = "transformer.transformer_blocks.0.attn.to_q"
    def values(n):
        return struct.pack(f"<{n}f", *(rng.gauss(0, 1) for _ in range(n)))
    return {f"{key}.lora_A.weight": ([rank, width], values(rank * width)),
            f"{key}.lora_B.weight": ([width, rank], values(rank * width))}


def simpletuner_metadata(rank: int, alpha: float) -> dict:
    """What SimpleTuner 4.10.1 writes into checkpoint-N's LoRA file (the final file has none)."""
    return {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}


def fake_lora_run(run: Path, steps=(2, 4, 6), rank: int = 4, alpha: float = 4) -> None:
    """LoRA checkpoints as sd3exp's trainer leaves them: each with its own weights."""
    training = run / "training"
    for step in steps:
        save_safetensors(training / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors", lora_tensors(step),
                         simpletuner_metadata(rank, alpha))
    (training / ".sd3exp-run").write_text(f"{run.resolve()}\n")


def colour(path: Path) -> tuple:
    return Image.open(path).convert("RGB").getpixel((0, 0))


def test_comfyui_sweep_with_a_base_column_and_a_failing_cell(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    def fail(g):
        return "CUDA out of memory" if ("checkpoint-4-" in json.dumps(g) and PROMPTS[1] in json.dumps(g)) else None
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 error_if=fail) as server:
        out = run_cli("experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16",
                      f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
                      f"eval.models_dir={models}", "eval.include_final=false", f"eval.prompts={json.dumps(PROMPTS)}",
                      "+eval.workflow_inputs.7.vae_name=my_sd3_vae.safetensors", "eval.include_base=true")
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 of 8 cells failed" in out.stderr and "CUDA out of memory" in out.stderr
    link, = (models / "loras" / "run").glob("checkpoint-4-*.safetensors")
    assert link.resolve() == (run / "training" / "checkpoint-4" / "pytorch_lora_weights.safetensors").resolve()
    cells = json.loads((run / "eval" / "cells.json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    assert [c["status"] for c in cells].count("ok") == 7
    assert list(dict.fromkeys(c["label"] for c in cells)) == ["base", "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [c["label"] for c in cells if c["status"] != "ok"] == ["checkpoint-4"]
    grid = Image.open(run / "eval" / "grid.png")
    assert grid.width > grid.height  # base + 3 checkpoint columns, 2 prompt rows
    assert "base model" in (run / "eval" / "report.html").read_text()
    saved = json.loads(Image.open(next((run / "eval" / "images").glob("*.png"))).text["prompt"])
    assert saved["7"]["inputs"]["vae_name"] == "my_sd3_vae.safetensors"


def test_many_grids_are_summed_up_and_an_error_ending_a_sentence_reads_once(tmp_path):
    """Seen against a real ComfyUI 0.3.64: 3,000 cells in 100 per-seed grids printed 100 paths on one line,
    and its error texts end with a full stop ("...a valid VAE.. They are drawn")."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    def fail(g):
        return "VAE is invalid." if "checkpoint-4-" in json.dumps(g) and '"seed": 5' in json.dumps(g) else None
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 error_if=fail) as server:
        out = run_cli("experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16",
                      f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
                      f"eval.models_dir={models}", "eval.include_final=false", "eval.include_base=false",
                      f"eval.prompts={json.dumps(PROMPTS[:1])}", "eval.seeds=[0,1,2,3,4,5]",
                      "eval.max_grid_pixels=320000")
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    grids = sorted(p.name for p in (run / "eval").glob("grid*.png"))
    assert len(grids) == 6
    line, = (x for x in out.stdout.splitlines() if x.startswith("evaluated 18 cell(s)"))
    assert line == f"evaluated 18 cell(s) (17 ok): 6 grids in {run / 'eval'} (grid-seed0.png ... grid-seed5.png)"
    assert "seed 5: KSampler (node 6) failed: RuntimeError: VAE is invalid. They are drawn as error tiles" in out.stderr


def test_a_second_evaluation_renders_only_what_changed(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run)
    def fail(g):
        return "CUDA out of memory" if ("checkpoint-4-" in json.dumps(g) and PROMPTS[1] in json.dumps(g)) else None
    common = ["experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
              "eval.backend=comfyui", f"eval.models_dir={models}", "eval.include_final=false", "eval.include_base=true"]
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 error_if=fail) as server:
        first = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(PROMPTS)}")
        assert first.returncode == 3 and len(server.queued) == 8, first.stderr[-2000:]
        before = {p.name: p.read_bytes() for p in (run / "eval" / "images").iterdir()}
        server.error_if = lambda g: None
        more = ["k4s4, green triangle", *PROMPTS]  # a new prompt, first: the old ones move to rows 1 and 2
        second = run_cli(*common, f"eval.url={server.url}", f"eval.prompts={json.dumps(more)}")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert len(server.queued) == 8 + 4 + 1  # the new row for 4 columns, and the cell that failed
    assert "reused 7 unchanged cell(s)" in second.stdout
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert [(c["label"], c["prompt"], c["status"]) for c in cells] == [
        (label, prompt, "ok") for label in ("base", "checkpoint-2", "checkpoint-4", "checkpoint-6") for prompt in more]
    moved = {f"{label}_p{i + 1}_s0.png": f"{label}_p{i}_s0.png" for label in ("base", "checkpoint-2", "checkpoint-6")
             for i in (0, 1)}
    assert all((run / "eval" / "images" / new).read_bytes() == before[old] for new, old in moved.items())
    assert sorted(before) == sorted(p.name for p in (run / "eval.previous-1" / "images").iterdir())


def test_a_run_can_be_evaluated_while_it_trains_but_not_twice_at_once(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        evaluate = ["experiment=demo_lora", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                    "eval.backend=comfyui", f"eval.url={server.url}", f"eval.models_dir={models}",
                    f"eval.prompts={json.dumps(PROMPTS[:1])}", "eval.include_base=false"]
        assert run_cli(*evaluate[:3], "stage=compile", *evaluate[3:5]).returncode == 0  # the run sd3exp compiled...
        fake_lora_run(run)  # ...has started training
        save_safetensors(run / "training" / "pytorch_lora_weights.safetensors", lora_tensors(99))  # maybe half written
        with exclusive(run, "train"):  # as `stage=train` holds it
            during = run_cli(*evaluate)
            refused = run_cli("experiment=demo_lora", "stage=train", "demo=false", "concepts.0.num_images=16",
                              f"hydra.run.dir={run}")
        with exclusive(run, "eval"):
            twice = run_cli(*evaluate)
        after = run_cli(*evaluate)
    assert during.returncode == 0, during.stderr[-2000:]
    assert "training is still running in another process" in during.stdout
    assert refused.returncode != 0 and "another sd3exp process is preparing or training" in refused.stderr
    assert twice.returncode != 0 and "another sd3exp process is evaluating" in twice.stderr
    assert after.returncode == 0 and "reused 3 unchanged cell(s)" in after.stdout, after.stderr[-2000:]
    cells = json.loads((run / "eval" / "cells.json").read_text())
    assert [c["label"] for c in cells] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]


def test_lora_columns_render_at_the_trained_scale_alpha_over_rank(tmp_path):
    """rank 4, alpha 8: checkpoint-2 (alpha in its metadata) and the final model (the same tensors, no
    metadata) must render identically, at scale 2, which differs from scale 1."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2,), rank=4, alpha=8)
    final = run / "training" / "pytorch_lora_weights.safetensors"
    save_safetensors(final, lora_tensors(2))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        out = run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", "lora.alpha=8",
                      f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
                      f"eval.models_dir={models}", f"eval.prompts={json.dumps(PROMPTS[:1])}")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        name = next(n for n in server.names("LoraLoaderModelOnly") if "final" in n)
        references = {}
        for scale in (1.0, 2.0):  # the shipped workflow with its loader's strength set by hand
            workflow = load_workflow(LORA_WORKFLOW)
            workflow["10"]["inputs"]["strength_model"] = scale
            spec = SweepSpec(workflow, [Checkpoint(None, "final", "lora", final)], {"final": name}, PROMPTS[:1])
            cell, = run_sweep(ComfyClient(server.url), spec, save_dir=tmp_path / f"ref-{scale}", progress=False)
            references[scale] = colour(cell.paths[0])
    images = run / "eval" / "images"
    assert colour(images / "checkpoint-2_p0_s0.png") == colour(images / "final_p0_s0.png") == references[2.0]
    assert references[1.0] != references[2.0]
    saved = json.loads(Image.open(images / "final_p0_s0.png").text["prompt"])
    assert saved["10"]["inputs"]["strength_model"] == 2.0
    assert "alpha/rank = 2" in out.stdout
    assert [c["lora_scale"] for c in json.loads((run / "eval" / "cells.json").read_text())] == [2.0, 2.0]


def test_a_retrained_checkpoint_is_not_served_from_comfyuis_cache(tmp_path):
    """ComfyUI caches a loader by its inputs: a file changed under the same name would give the old images."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    evaluate = ["experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                "eval.backend=comfyui", f"eval.models_dir={models}", "eval.include_final=false",
                f"eval.prompts={json.dumps(PROMPTS[:1])}"]
    weights = run / "training" / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    images = run / "eval" / "images"
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        first = run_cli(*evaluate, f"eval.url={server.url}")
        assert first.returncode == 0, first.stderr[-2000:]
        old = colour(images / "checkpoint-2_p0_s0.png")
        save_safetensors(weights, lora_tensors(102), simpletuner_metadata(4, 4))  # retrained: same name, new weights
        second = run_cli(*evaluate, f"eval.url={server.url}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reused 1 unchanged cell(s)" in second.stdout
    with StandIn(tmp_path / "comfy-out-2", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as cold:
        name = next(n for n in cold.names("LoraLoaderModelOnly") if n.startswith("run/checkpoint-2"))
        spec = SweepSpec(load_workflow(LORA_WORKFLOW), [Checkpoint(2, "checkpoint-2", "lora", weights)],
                         {"checkpoint-2": name}, PROMPTS[:1], strengths={"checkpoint-2": 1.0})
        fresh, = run_sweep(ComfyClient(cold.url), spec, save_dir=tmp_path / "fresh", progress=False)
    assert colour(images / "checkpoint-2_p0_s0.png") == colour(fresh.paths[0]) != old


def extra_paths_run(tmp_path: Path) -> tuple:
    """A one-checkpoint LoRA run that ComfyUI scans itself (eval.link_mode=extra_paths): the run folder, the
    models folder, the eval command line and the checkpoint's weights file."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2,))
    models.mkdir()
    (models / "loras").symlink_to(run / "training")  # what extra_model_paths.yaml makes ComfyUI scan
    evaluate = ["experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                "eval.backend=comfyui", "eval.link_mode=extra_paths", "eval.include_final=false",
                f"eval.prompts={json.dumps(PROMPTS[:1])}"]
    return run, models, evaluate, run / "training" / "checkpoint-2" / "pytorch_lora_weights.safetensors"


def test_with_extra_model_paths_a_retrained_checkpoint_frees_comfyuis_cache_first(tmp_path):
    """eval.link_mode=extra_paths: ComfyUI names the file by its own path, which a retrain keeps."""
    run, models, evaluate, weights = extra_paths_run(tmp_path)
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        assert run_cli(*evaluate, f"eval.url={server.url}").returncode == 0
        old = colour(run / "eval" / "images" / "checkpoint-2_p0_s0.png")
        save_safetensors(weights, lora_tensors(102), simpletuner_metadata(4, 4))
        second = run_cli(*evaluate, f"eval.url={server.url}")
        assert second.returncode == 0, second.stderr[-2000:]
    with StandIn(tmp_path / "comfy-out-2", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as cold:
        spec = SweepSpec(load_workflow(LORA_WORKFLOW), [Checkpoint(2, "checkpoint-2", "lora", weights)],
                         {"checkpoint-2": "checkpoint-2/pytorch_lora_weights.safetensors"}, PROMPTS[:1])
        fresh, = run_sweep(ComfyClient(cold.url), spec, save_dir=tmp_path / "fresh", progress=False)
    assert colour(run / "eval" / "images" / "checkpoint-2_p0_s0.png") == colour(fresh.paths[0]) != old
    assert len(server.frees) == 1 and "POST /free" in second.stdout


def test_with_extra_model_paths_nothing_is_freed_when_comfyui_cannot_load_the_checkpoints(tmp_path):
    """POST /free unloads every user's models: a sweep that stops at the name check must not send it."""
    run, models, evaluate, weights = extra_paths_run(tmp_path)
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        assert run_cli(*evaluate, f"eval.url={server.url}").returncode == 0
        save_safetensors(weights, lora_tensors(102), simpletuner_metadata(4, 4))
        (models / "loras").unlink()  # ComfyUI restarted without --extra-model-paths-config
        second = run_cli(*evaluate, f"eval.url={server.url}")
    assert second.returncode == 2 and "cannot load 1 model(s)" in second.stderr, second.stderr[-2000:]
    assert server.frees == [] and "POST /free" not in second.stdout
    assert f"Fix: restart ComfyUI with --extra-model-paths-config {run / 'comfyui_extra_model_paths.yaml'} (it reads " \
        "that file only when it starts)" in second.stderr  # it said to add eval.link_mode=extra_paths, already set


def test_links_in_a_models_folder_comfyui_does_not_read_are_named_as_such(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2,))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        out = comfy_eval(run, tmp_path / "elsewhere", server.url)
        fixed = comfy_eval(run, models, server.url)  # the models folder this ComfyUI reads
    assert out.returncode == 2 and "cannot load 1 model(s)" in out.stderr
    assert (f"Fix: the ComfyUI at {server.url} does not list the links made in eval.models_dir={tmp_path / 'elsewhere'}"
            " (a warning above names any that could not be made): set eval.models_dir to the models folder that "
            "ComfyUI reads, or use eval.link_mode=extra_paths.") in out.stderr
    assert fixed.returncode == 0, fixed.stderr[-1500:]

def comfy_eval(run: Path, models: Path, url: str, *extra: str):
    return run_cli("experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
                   "eval.backend=comfyui", f"eval.url={url}", f"eval.models_dir={models}", "eval.include_final=false",
                   f"eval.prompts={json.dumps(PROMPTS)}", *extra)


def test_failed_cells_are_retried_and_the_exit_status_stays_3_while_any_fails(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    failing = {"on": True}
    def fail(g):
        return "CUDA out of memory" if failing["on"] and "checkpoint-4-" in json.dumps(g) \
            and PROMPTS[1] in json.dumps(g) else None
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 error_if=fail) as server:
        first = comfy_eval(run, models, server.url)
        again = comfy_eval(run, models, server.url)
        queued_while_failing = len(server.queued)
        failing["on"] = False
        fixed = comfy_eval(run, models, server.url)
        done = comfy_eval(run, models, server.url)
    assert (first.returncode, again.returncode) == (3, 3), again.stdout[-1500:] + again.stderr[-1500:]
    assert "already evaluated" not in again.stdout and queued_while_failing == 4 + 1
    assert "reused 3 unchanged cell(s)" in again.stdout
    assert fixed.returncode == 0 and len(server.queued) == 4 + 1 + 1, fixed.stderr[-1500:]
    assert [c["status"] for c in json.loads((run / "eval" / "cells.json").read_text())] == ["ok"] * 4
    assert done.returncode == 0 and "already evaluated" in done.stdout


def test_a_failed_start_leaves_the_earlier_evaluation_in_place(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        assert comfy_eval(run, models, server.url).returncode == 0
        before = sorted(p.relative_to(run).as_posix() for p in (run / "eval").rglob("*"))
        failures = [comfy_eval(run, models, server.url, "eval.include_base=true",
                               "+eval.workflow_inputs.1.unet_name=no_such_model.safetensors"),
                    comfy_eval(run, models, server.url, "eval.seeds=[]"),
                    comfy_eval(run, models, "", "eval.url=null")]
        assert [f.returncode for f in failures] == [2, 2, 2], [f.stderr[-500:] for f in failures]
        assert sorted(p.relative_to(run).as_posix() for p in (run / "eval").rglob("*")) == before
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("eval")) == ["eval"]
        queued = len(server.queued)
        again = comfy_eval(run, models, server.url)
        assert again.returncode == 0 and "already evaluated" in again.stdout and len(server.queued) == queued
        # an evaluation folder left empty by an older sd3exp: cells come from the latest complete one
        (run / "eval").rename(run / "eval.previous-1")
        (run / "eval").mkdir()
        more = comfy_eval(run, models, server.url, "eval.seeds=[0,1]")
    assert more.returncode == 0, more.stderr[-1500:]
    assert "reused 4 unchanged cell(s) (4 from eval.previous-1)" in more.stdout and len(server.queued) == queued + 4


def test_a_workflow_input_comfyui_lacks_is_refused_before_any_cell_and_the_fix_works(tmp_path):
    """Seen against a real ComfyUI 0.3.64: a VAE name it lacks had every cell queued and refused, and the
    earlier evaluation archived behind a grid of error tiles. Now: the first refusal of an input no cell
    sets stops the sweep (nothing else queued, eval/ as it was), with the closest name ComfyUI lists."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    vaes = {"VAELoader": {"vae_name": ["flux_ae.safetensors", "sd3_medium_vae.safetensors"]}}
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as ok:
        assert comfy_eval(run, models, ok.url).returncode == 0
    before = {p.relative_to(run / "eval"): p.read_bytes() for p in (run / "eval").rglob("*") if p.is_file()}
    with StandIn(tmp_path / "comfy-out2", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 combos=vaes) as server:
        out = comfy_eval(run, models, server.url, "eval.seeds=[0,1]")
        fixed = comfy_eval(run, models, server.url, "eval.seeds=[0,1]",
                           *fix_overrides(out.stderr, r"\+\+eval\.\S+"))
    assert out.returncode == 2, out.stderr[-1500:]
    assert "Value not in list: vae_name: 'sd3_vae.safetensors' not in" in out.stderr
    assert "Nothing was queued: every cell uses these inputs of eval.workflow. Fix: add " \
        "++eval.workflow_inputs.7.vae_name=sd3_medium_vae.safetensors (the closest name; ComfyUI lists " \
        "flux_ae.safetensors, sd3_medium_vae.safetensors)" in out.stderr
    assert fixed.returncode == 0, fixed.stderr[-1500:]
    assert len(server.queued) == 8  # the refused first cell never queued; the fixed run's 8 (a new VAE: none reused)
    saved = json.loads(Image.open(next((run / "eval" / "images").glob("*_s1.png"))).text["prompt"])
    assert saved["7"]["inputs"]["vae_name"] == "sd3_medium_vae.safetensors"
    kept = run / "eval.previous-1"  # the first evaluation, as it was, archived by the fixed run only
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_keeps_the_finished_cells_and_cleans_the_servers_queue(tmp_path, signum, code):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2, 4))
    args = ["experiment=demo_quick", "stage=eval", "demo=false", "concepts.0.num_images=16", f"hydra.run.dir={run}",
            "eval.backend=comfyui", f"eval.models_dir={models}", "eval.include_final=false",
            f"eval.prompts={json.dumps(PROMPTS)}", "eval.seeds=[0,1]"]
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 delay_s=0.4) as server:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", *args, f"eval.url={server.url}"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.finished < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
        time.sleep(0.3)
        left = server.queue_state()
        queued = len(server.queued)
        assert proc.returncode == code, stdout[-1500:] + stderr[-1500:]
        assert left == {"queue_running": [], "queue_pending": []} and len(server.deleted) >= 1
        kept = json.loads((run / "eval" / "cells.json").read_text())
        assert 1 <= len(kept) < 8 and all(c["status"] == "ok" for c in kept)
        assert "Traceback" not in stderr and [line.startswith("sd3exp:") for line in stderr.splitlines()].count(True) == 1
        assert f"kept {len(kept)} newly rendered cell(s)" in stderr
        again = shlex.split(stderr.split("Continue with: ")[1].strip())
        assert again[:3] == ["python", "-m", "sd3exp"]
        after = subprocess.run([sys.executable, *again[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stdout[-1500:] + after.stderr[-1500:]
    assert len(server.queued) == queued + 8 - len(kept) and f"reused {len(kept)} unchanged cell(s)" in after.stdout


def fix_overrides(stderr: str, pattern: str) -> list[str]:
    """The overrides a printed fix names, split as a shell would split them when pasted."""
    return shlex.split(re.search(pattern, stderr.split("Fix:")[1]).group(0))


def test_every_fix_hint_of_the_evaluation_works_when_pasted(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2,))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        base = ["eval.include_base=true", "+eval.workflow_inputs.1.unet_name=sd3_medium.safetensors"]
        wrong = comfy_eval(run, models, server.url, *base)
        assert wrong.returncode == 2 and "Fix:" in wrong.stderr
        fixed = comfy_eval(run, models, server.url, *base, *fix_overrides(wrong.stderr, r"'\+\+eval\.[^']*'|\+\+eval\.\S+"))
        assert fixed.returncode == 0, fixed.stderr[-1500:]
        for broken, pattern in ((["eval.seeds=[]"], r"eval\.seeds='[^']*'"),
                                (["eval.prompts=[]"], r"eval\.prompts='[^']*'"),
                                (["eval.workflow=null"], r"eval\.workflow='[^']*'")):
            out = comfy_eval(run, models, server.url, *broken)
            assert out.returncode == 2, out.stderr[-500:]
            again = comfy_eval(run, models, server.url, *broken, *fix_overrides(out.stderr, pattern))
            assert again.returncode == 0, again.stderr[-1500:]


def test_node_hints_are_overrides_that_select_the_node():
    workflow = json.loads(json.dumps(load_workflow(LORA_WORKFLOW)))
    workflow["11"] = {**workflow["10"], "inputs": {**workflow["10"]["inputs"]}}  # two LoRA loaders
    with pytest.raises(EvalError) as err:
        find_nodes(workflow, "lora")
    override, = fix_overrides(str(err.value), r"'\+\+eval\.nodes[^']*'|\+\+eval\.nodes\S+")
    cfg = compose_experiment("demo", [override])
    assert find_nodes(workflow, "lora", cfg.eval.nodes).loader == "10"


def test_sigterm_before_any_cell_finished_leaves_nothing_behind(tmp_path):
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(2,))
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 delay_s=3.0) as server:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", "experiment=demo_quick", "stage=eval", "demo=false",
                                 "concepts.0.num_images=16", f"hydra.run.dir={run}", "eval.backend=comfyui",
                                 f"eval.url={server.url}", f"eval.models_dir={models}", "eval.include_final=false",
                                 f"eval.prompts={json.dumps(PROMPTS)}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(server.queued) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        time.sleep(0.3)
        assert server.queue_state() == {"queue_running": [], "queue_pending": []}
    assert proc.returncode == 143 and "no new cell was finished" in stderr, stderr[-1500:]
    assert not (run / "eval").exists() and not (run / "eval.next").exists()
