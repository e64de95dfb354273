"""The eval and report stages: render every checkpoint, then the grid(s), cells.json and report.html."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, List, Mapping, Sequence

from sd3exp.errors import EvalError
from sd3exp.evaluate import cells as cellio
from sd3exp.evaluate.checkpoints import Checkpoint, discover
from sd3exp.evaluate.comfyui import Cell, Sampling
from sd3exp.evaluate.grid import write_grids
from sd3exp.evaluate.report import write_report
from sd3exp.io import write_json
from sd3exp.schema import EvalConfig, ExperimentConfig


class CellsFailed(EvalError):
    """The sweep finished, but some cells failed (drawn as error tiles)."""

    exit_code = 3


def sampling_of(ev: EvalConfig) -> Sampling:
    return Sampling(ev.negative_prompt or None, ev.steps, ev.cfg, ev.width, ev.height)


def request_key(ev: EvalConfig, checkpoints: Sequence[Checkpoint]) -> str:
    """What was asked for: the same key means the earlier evaluation can be reused."""
    data = {"backend": ev.backend, "prompts": ev.prompts, "seeds": ev.seeds, "sampling": asdict(sampling_of(ev)),
            "include_base": ev.include_base,
            "workflow": [ev.workflow, ev.workflow_inputs] if ev.backend == "comfyui" else None,
            "checkpoints": [[c.label, str(c.path), c.path.stat().st_mtime_ns] for c in checkpoints]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_name(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The run's folder name inside ComfyUI's models folders."""
    try:
        rel = run_dir.relative_to(Path(cfg.paths.output_root).resolve()).as_posix()
    except ValueError:
        rel = run_dir.name
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", rel)


def render_diffusers(cfg: ExperimentConfig, checkpoints: List[Checkpoint], eval_dir: Path) -> List[Cell]:
    from sd3exp.evaluate.diffusers_backend import render
    from sd3exp.stages import trainer_for

    env = trainer_for(cfg)
    ev = cfg.eval
    return render(cfg.model.path, checkpoints, ev.prompts, ev.seeds, eval_dir / "images", env.python,
                  sampling_of(ev), ev.include_base, ev.timeout_s)


def with_inputs(graph: dict, inputs: Mapping[str, Any]) -> dict:
    """eval.workflow_inputs applied: your text-encoder, VAE and base-model names without editing the JSON."""
    for node_id, values in inputs.items():
        if node_id not in graph:
            raise EvalError(f"eval.workflow_inputs.{node_id}: the workflow has no node {node_id!r}. "
                            f"Fix: use one of its node ids: {', '.join(sorted(graph))}")
        graph[node_id]["inputs"].update(values)
    return graph


def render_comfyui(cfg: ExperimentConfig, checkpoints: List[Checkpoint], run_dir: Path) -> List[Cell]:
    from sd3exp.evaluate import comfyui, links

    ev = cfg.eval
    if not ev.url or not ev.workflow:
        raise EvalError("eval.backend=comfyui needs eval.url (e.g. http://127.0.0.1:8188) and eval.workflow "
                        "(an API-format workflow; conf/workflows/sd3_api.json is the default)")
    name, training = run_name(cfg, run_dir), Path(cfg.paths.training_dir)
    mode = ev.link_mode
    if mode == "symlink" and ev.models_dir:
        problems = [a.message for a in links.link_checkpoints(checkpoints, ev.models_dir, name) if a.problem]
        for p in problems:
            print(f"warning: {p}")
    elif mode == "extra_paths":
        snippet = links.extra_paths_yaml(name, training, sorted({c.kind for c in checkpoints}))
        links.write_extra_paths(run_dir / "eval" / "extra_model_paths.yaml", snippet)
        print(f"ComfyUI: start it with --extra-model-paths-config {run_dir / 'eval' / 'extra_model_paths.yaml'}")
    workflow = with_inputs(comfyui.load_workflow(ev.workflow), ev.workflow_inputs)
    spec = comfyui.SweepSpec(workflow, checkpoints,
                             {c.label: links.comfy_name(c, name, mode, training) for c in checkpoints},
                             ev.prompts, ev.seeds, sampling_of(ev), dict(ev.nodes), include_base=ev.include_base)
    result = comfyui.run_sweep(comfyui.ComfyClient(ev.url), spec, timeout_s=ev.timeout_s)
    return cellio.store_images(result, run_dir / "eval" / "images")


def checkpoints_to_render(cfg: ExperimentConfig) -> List[Checkpoint]:
    ev = cfg.eval
    found = discover(cfg.paths.training_dir, ev.every_k, ev.min_step, ev.max_step, ev.include_final)
    for problem in found.problems:
        print(f"warning: {problem}")
    if not found.checkpoints:
        raise EvalError(f"no complete checkpoints in {cfg.paths.training_dir}; train first (stage=train)")
    if not ev.prompts:
        raise EvalError("eval.prompts is empty. Fix: list the prompts to render, e.g. eval.prompts='[\"k4s4, a castle\"]'")
    return found.checkpoints


def archive_previous(eval_dir: Path) -> None:
    """Keep an earlier evaluation (different request) beside the new one instead of overwriting it."""
    if eval_dir.exists() and any(eval_dir.iterdir()):
        n = 1
        while eval_dir.with_name(f"eval.previous-{n}").exists():
            n += 1
        eval_dir.rename(eval_dir.with_name(f"eval.previous-{n}"))
        print(f"an earlier evaluation with other settings was kept as {eval_dir.with_name(f'eval.previous-{n}')}")


def evaluate(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Render, grid, cells.json, report.html; returns the report's path."""
    if cfg.eval.backend == "none":
        print("eval.backend=none: evaluation skipped")
        return run_dir
    eval_dir = run_dir / "eval"
    checkpoints = checkpoints_to_render(cfg)
    key = request_key(cfg.eval, checkpoints)
    if (eval_dir / "request.json").is_file() and json.loads((eval_dir / "request.json").read_text())["key"] == key:
        print(f"already evaluated with these settings: {eval_dir / 'report.html'}")
        return eval_dir / "report.html"
    archive_previous(eval_dir)
    eval_dir.mkdir(parents=True)
    backend = render_comfyui if cfg.eval.backend == "comfyui" else None
    cells = backend(cfg, checkpoints, run_dir) if backend else render_diffusers(cfg, checkpoints, eval_dir)
    return finish(cfg, run_dir, cells, key)


def finish(cfg: ExperimentConfig, run_dir: Path, cells: List[Cell], key: str) -> Path:
    eval_dir = run_dir / "eval"
    grids = write_grids(cells, eval_dir, cfg.eval.max_grid_pixels)
    cellio.write_cells_json(cells, eval_dir / "cells.json")
    report = write_report(run_dir, cells, grids, title=cfg.name)
    write_json(eval_dir / "request.json", {"key": key})
    failed = [c for c in cells if c.status != "ok"]
    print(f"evaluated {len(cells)} cell(s) ({len(cells) - len(failed)} ok): {', '.join(str(g) for g in grids)}")
    print(f"report: {report}")
    if failed:
        first = failed[0]
        raise CellsFailed(f"{len(failed)} of {len(cells)} cells failed, e.g. {first.label} prompt "
                          f"{first.prompt_index} seed {first.seed}: {first.error}. They are drawn as error tiles in "
                          f"the grid; see {report}")
    return report
