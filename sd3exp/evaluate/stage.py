"""The eval and report stages: render every checkpoint (reusing unchanged cells of the last
evaluation), then the grid(s), cells.json and report.html."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, FrozenSet, List, Mapping, Optional, Sequence

from sd3exp.errors import EvalError
from sd3exp.evaluate import cells as cellio
from sd3exp.evaluate import reuse
from sd3exp.evaluate.checkpoints import BASE_LABEL, Checkpoint, discover
from sd3exp.evaluate.comfyui import Cell, Sampling
from sd3exp.evaluate.grid import write_grids
from sd3exp.evaluate.report import write_report
from sd3exp.evaluate.score import best_label, check_scoring, choose_best, print_best, scoring_request, summary_line
from sd3exp.io import read_json, write_json
from sd3exp.runfolder import training_elsewhere
from sd3exp.schema import EvalConfig, ExperimentConfig


class CellsFailed(EvalError):
    """The sweep finished, but some cells failed (drawn as error tiles)."""

    exit_code = 3


def sampling_of(ev: EvalConfig) -> Sampling:
    return Sampling(ev.negative_prompt or None, ev.steps, ev.cfg, ev.width, ev.height)


def render_settings(cfg: ExperimentConfig) -> dict:
    """Everything a cell's pixels depend on besides its checkpoint, prompt and seed."""
    ev = cfg.eval
    data: dict = {"backend": ev.backend, "sampling": asdict(sampling_of(ev))}
    if ev.backend == "comfyui":
        workflow = Path(ev.workflow)
        data["workflow"] = [hashlib.sha256(workflow.read_bytes()).hexdigest() if workflow.is_file() else ev.workflow,
                            ev.workflow_inputs, dict(ev.nodes)]
    else:
        data["base_model"] = str(Path(cfg.model.path).resolve())
    return data


def request_record(cfg: ExperimentConfig, checkpoints: Sequence[Checkpoint]) -> dict:
    """What was asked for (request.json): the same record means the earlier evaluation stands as it is."""
    ev = cfg.eval
    return {"settings": render_settings(cfg), "checkpoints": reuse.fingerprints(checkpoints, ev.include_base),
            "prompts": list(ev.prompts), "seeds": list(ev.seeds), "scoring": scoring_request(cfg)}


def run_name(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The run's folder name inside ComfyUI's models folders."""
    try:
        rel = run_dir.relative_to(Path(cfg.paths.output_root).resolve()).as_posix()
    except ValueError:
        rel = run_dir.name
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", rel)


def render_diffusers(cfg: ExperimentConfig, job: RenderJob, run_dir: Path) -> List[Cell]:
    from sd3exp.evaluate.diffusers_backend import render
    from sd3exp.stages import trainer_for

    env = trainer_for(cfg)
    ev = cfg.eval
    return render(cfg.model.path, job.checkpoints, ev.prompts, ev.seeds, run_dir / "eval" / "images", env.python,
                  sampling_of(ev), job.include_base, ev.timeout_s, skip=job.skip)


def with_inputs(graph: dict, inputs: Mapping[str, Any]) -> dict:
    """eval.workflow_inputs applied: your text-encoder, VAE and base-model names without editing the JSON."""
    for node_id, values in inputs.items():
        if node_id not in graph:
            raise EvalError(f"eval.workflow_inputs.{node_id}: the workflow has no node {node_id!r}. "
                            f"Fix: use one of its node ids: {', '.join(sorted(graph))}")
        graph[node_id]["inputs"].update(values)
    return graph


def render_comfyui(cfg: ExperimentConfig, job: RenderJob, run_dir: Path) -> List[Cell]:
    from sd3exp.evaluate import comfyui, links

    ev, checkpoints = cfg.eval, job.checkpoints
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
                             ev.prompts, ev.seeds, sampling_of(ev), dict(ev.nodes), include_base=job.include_base,
                             skip=job.skip)
    result = comfyui.run_sweep(comfyui.ComfyClient(ev.url), spec, timeout_s=ev.timeout_s)
    return cellio.store_images(result, run_dir / "eval" / "images")


def checkpoints_to_render(cfg: ExperimentConfig, run_dir: Path) -> List[Checkpoint]:
    ev = cfg.eval
    final = ev.include_final
    if cfg.stage == "eval" and training_elsewhere(run_dir):
        print("training is still running in another process: evaluating the checkpoints finished so far, without "
              "the final model; evaluate again when it ends (only new cells are rendered)")
        final = False
    found = discover(cfg.paths.training_dir, ev.every_k, ev.min_step, ev.max_step, final)
    for problem in found.problems:
        print(f"warning: {problem}")
    if not found.checkpoints:
        raise EvalError(f"no complete checkpoints in {cfg.paths.training_dir}; train first (stage=train)")
    if not ev.prompts:
        raise EvalError("eval.prompts is empty. Fix: list the prompts to render, e.g. eval.prompts='[\"k4s4, a castle\"]'")
    return found.checkpoints


def archive_previous(eval_dir: Path) -> Optional[Path]:
    """Keep an earlier evaluation (different request) beside the new one instead of overwriting it."""
    if not (eval_dir.exists() and any(eval_dir.iterdir())):
        return None
    n = 1
    while eval_dir.with_name(f"eval.previous-{n}").exists():
        n += 1
    kept = eval_dir.rename(eval_dir.with_name(f"eval.previous-{n}"))
    print(f"an earlier evaluation with other settings was kept as {kept}")
    return kept


@dataclass(frozen=True)
class RenderJob:
    """The cells still to render: these checkpoints (and the base model) x prompts x seeds, less `skip`."""

    checkpoints: List[Checkpoint]
    include_base: bool
    skip: FrozenSet[reuse.CellKey]


def render_job(checkpoints: List[Checkpoint], include_base: bool, all_cells: List[reuse.CellKey],
               reused: Mapping[reuse.CellKey, Cell]) -> RenderJob:
    """Only the checkpoints with a cell that was not reused are loaded."""
    todo = {key[0] for key in all_cells if key not in reused}
    return RenderJob([c for c in checkpoints if c.label in todo], include_base and BASE_LABEL in todo,
                     frozenset(reused))


def evaluate(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Render what is not reusable from the last evaluation, then grid, cells.json, report.html;
    returns the report's path."""
    ev = cfg.eval
    if ev.backend == "none":
        print("eval.backend=none: evaluation skipped")
        return run_dir
    eval_dir = run_dir / "eval"
    check_scoring(cfg)
    checkpoints = checkpoints_to_render(cfg, run_dir)
    record = request_record(cfg, checkpoints)
    if (eval_dir / "request.json").is_file() and read_json(eval_dir / "request.json") == record:
        print(f"already evaluated with these settings: {eval_dir / 'report.html'}")
        print_best(eval_dir)
        return eval_dir / "report.html"
    kept = archive_previous(eval_dir)
    previous, before = reuse.load_previous(kept)
    eval_dir.mkdir(parents=True)
    reused = reuse.adopt(reuse.reusable(previous, before, record, ev.prompts, ev.seeds), eval_dir / "images")
    all_cells = reuse.wanted(list(record["checkpoints"]), ev.prompts, ev.seeds)
    job = render_job(checkpoints, ev.include_base, all_cells, reused)
    backend = render_comfyui if ev.backend == "comfyui" else render_diffusers
    rendered = backend(cfg, job, run_dir) if job.checkpoints or job.include_base else []
    if reused:
        print(f"reused {len(reused)} unchanged cell(s) from {kept}; rendered {len(rendered)}")
    by_key = {**reused, **{(c.label, c.prompt_index, c.seed): c for c in rendered}}
    return finish(cfg, run_dir, [by_key[key] for key in all_cells], record)


def finish(cfg: ExperimentConfig, run_dir: Path, cells: List[Cell], record: dict) -> Path:
    eval_dir = run_dir / "eval"
    cells, choice = choose_best(cfg, run_dir, cells, record)
    grids = write_grids(cells, eval_dir, cfg.eval.max_grid_pixels, best=best_label(choice))
    cellio.write_cells_json(cells, eval_dir / "cells.json")
    report = write_report(run_dir, cells, grids, title=cfg.name)
    write_json(eval_dir / "request.json", record)
    failed = [c for c in cells if c.status != "ok"]
    print(f"evaluated {len(cells)} cell(s) ({len(cells) - len(failed)} ok): {', '.join(str(g) for g in grids)}")
    print(f"report: {report}")
    if choice:
        print(summary_line(choice))
    if failed:
        first = failed[0]
        raise CellsFailed(f"{len(failed)} of {len(cells)} cells failed, e.g. {first.label} prompt "
                          f"{first.prompt_index} seed {first.seed}: {first.error}. They are drawn as error tiles in "
                          f"the grid; see {report}")
    return report
