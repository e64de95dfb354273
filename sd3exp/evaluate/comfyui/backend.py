"""The ComfyUI backend of the eval stage: the checkpoints made loadable (linked, or an
extra_model_paths file), the workflow set up, the sweep run, its images stored."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Mapping, cast

from sd3exp import console
from sd3exp.errors import ConfigError
from sd3exp.evaluate import links
from sd3exp.evaluate.cells import Cell, RenderJob, Sampling
from sd3exp.evaluate.comfyui.client import ComfyClient
from sd3exp.evaluate.comfyui.sweep import SweepSpec, resolve_names, run_sweep
from sd3exp.evaluate.comfyui.workflow import Graph, load_workflow, with_inputs
from sd3exp.layout import RunLayout
from sd3exp.schema import ExperimentConfig


def run_name(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The run's folder name inside ComfyUI's models folders."""
    try:
        rel = run_dir.relative_to(Path(cfg.paths.output_root).resolve()).as_posix()
    except ValueError:
        rel = run_dir.name
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", rel)


def render(cfg: ExperimentConfig, job: RenderJob, run_dir: Path, images: Path) -> List[Cell]:
    """The job's cells rendered by the ComfyUI server at eval.url; their images stored in `images`."""
    ev, checkpoints = cfg.eval, job.checkpoints
    name, training = run_name(cfg, run_dir), Path(cfg.paths.training_dir)
    mode = cast(links.LinkMode, ev.link_mode)  # one of them: sd3exp/validate.py
    if not ev.url:  # checked before rendering (sd3exp/evaluate/stage.py)
        raise ConfigError("eval.url", ev.url, "eval.backend=comfyui needs the ComfyUI server's address",
                          "add eval.url=http://127.0.0.1:8188")
    if mode == "symlink" and ev.models_dir:
        problems = [a.message for a in links.link_checkpoints(checkpoints, ev.models_dir, name) if a.problem]
        for p in problems:
            console.warn(p)
    elif mode == "extra_paths":
        snippet = links.extra_paths_yaml(name, training, sorted({c.kind for c in checkpoints}))
        links.write_extra_paths(RunLayout(run_dir).extra_paths, snippet)
        console.info(f"ComfyUI: start it with --extra-model-paths-config {RunLayout(run_dir).extra_paths}")
    client = ComfyClient(ev.url)
    names = {c.label: links.comfy_name(c, name, mode, training) for c in checkpoints}
    fix = names_fix(cfg, run_dir)
    if mode == "extra_paths" and job.changed:
        resolve_names(client, checkpoints, names, fix)  # unloadable names fail before the shared server is freed
        console.info(f"ComfyUI loads {', '.join(sorted(job.changed))} under an unchanged name but the file changed: "
                     "freeing its models and node cache first (POST /free)")
        client.free()
    workflow = with_inputs(load_workflow(ev.workflow), ev.workflow_inputs)
    strengths = {label: s.comfy_strength for label, s in job.strengths.items()}
    warn_strength_override(workflow, ev.workflow_inputs, strengths)
    spec = SweepSpec(workflow, checkpoints, names, ev.prompts, ev.seeds, Sampling.of(ev), dict(ev.nodes),
                     include_base=job.include_base, skip=job.skip, strengths=strengths, variants=job.variants,
                     names_fix=fix)
    return run_sweep(client, spec, images, timeout_s=ev.timeout_s)  # made durable as the grid is drawn (stage.finish)


def names_fix(cfg: ExperimentConfig, run_dir: Path) -> str:
    """What to do when ComfyUI lists none of the checkpoints' names, for the link mode in use."""
    ev = cfg.eval
    if ev.link_mode == "extra_paths":
        return (f"restart ComfyUI with --extra-model-paths-config {RunLayout(run_dir).extra_paths} (it reads that "
                "file only when it starts), or link them instead: eval.link_mode=symlink "
                "eval.models_dir=/path/to/ComfyUI/models.")
    if not ev.models_dir:
        return ("add eval.models_dir=/path/to/ComfyUI/models (sd3exp links the checkpoints there), or "
                "eval.link_mode=extra_paths.")
    return (f"the ComfyUI at {ev.url} does not list the links made in eval.models_dir={ev.models_dir} (a warning "
            "above names any that could not be made): set eval.models_dir to the models folder that ComfyUI reads, "
            "or use eval.link_mode=extra_paths.")


def warn_strength_override(workflow: Graph, inputs: Mapping[str, Any], strengths: Mapping[str, float]) -> None:
    """A strength_model the user set in eval.workflow_inputs is replaced per checkpoint: say so."""
    for node_id, values in inputs.items():
        if "strength_model" in values and strengths and workflow[node_id]["class_type"] == "LoraLoaderModelOnly":
            console.warn(f"eval.workflow_inputs.{node_id}.strength_model={values['strength_model']!r} is replaced "
                         "by each checkpoint's trained scale (alpha/rank), so the grid shows what was trained")
