"""The eval and report stages: render every checkpoint (reusing unchanged cells of the last
evaluation), then the grid(s), cells.json and report.html."""

from __future__ import annotations

import hashlib
import importlib
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from sd3exp import console
from sd3exp.errors import ConfigError, EvalError
from sd3exp.evaluate import axes as axismod
from sd3exp.evaluate import cells as cellio
from sd3exp.evaluate import lora_scale, reuse
from sd3exp.evaluate.cells import Cell, RenderJob, Sampling, SweepInterrupted, Variant, cell_key
from sd3exp.evaluate.checkpoints import BASE_LABEL, Checkpoint, discover
from sd3exp.evaluate.grid import write_grids
from sd3exp.evaluate.lora_scale import Strength
from sd3exp.evaluate.report import write_report
from sd3exp.evaluate.score import (
    best_label,
    best_variant,
    check_scoring,
    choose_best,
    print_best,
    scoring_request,
    summary_line,
    unscored_by_models,
)
from sd3exp.hub import is_repo_id
from sd3exp.io import background, fsync_all, synced, write_json
from sd3exp.layout import EvalLayout, RunLayout
from sd3exp.runfolder import training_elsewhere
from sd3exp.schema import ExperimentConfig
from sd3exp.signals import Stopped, sigterm_raises
from sd3exp.workers.render_device import DEVICES, DTYPES

SHIPPED_WORKFLOWS = {"full": "sd3_api.json", "lora": "sd3_lora_api.json"}  # model.type -> conf/workflows/


class CellsFailed(EvalError):
    """The sweep finished, but some cells failed (drawn as error tiles)."""

    exit_code = 3


class ScoringFailed(EvalError):
    """The scoring worker failed; the evaluation is kept without the model measures."""

    exit_code = 3


class EvalInterrupted(EvalError):
    """Ctrl-C or SIGTERM: the finished cells were kept; exit 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> Any:  # pickled with a failed job's result (submitit)
        return type(self), (self.args[0], self.exit_code)


def render_settings(cfg: ExperimentConfig) -> dict:
    """Everything a cell's pixels depend on besides its checkpoint, prompt and seed."""
    ev = cfg.eval
    data: dict = {"backend": ev.backend, "sampling": asdict(Sampling.of(ev))}
    if ev.backend == "comfyui":
        workflow = Path(ev.workflow) if ev.workflow else None
        data["workflow"] = [hashlib.sha256(workflow.read_bytes()).hexdigest() if workflow and workflow.is_file()
                            else ev.workflow,
                            ev.workflow_inputs, dict(ev.nodes)]
    else:
        model = cfg.model.path
        data["base_model"] = model if is_repo_id(model) else str(Path(model).resolve())
        data["device"] = {k: getattr(ev, k) for k in ("device", "dtype", "offload", "t5")}
    return data


def request_record(cfg: ExperimentConfig, checkpoints: Sequence[Checkpoint],
                   strengths: Optional[Mapping[str, Strength]] = None) -> dict:
    """What was asked for (request.json): the same record means the earlier evaluation stands as it is."""
    ev = cfg.eval
    scales = {label: s.trained for label, s in (strengths or {}).items()}
    return {"settings": render_settings(cfg), "checkpoints": reuse.fingerprints(checkpoints, ev.include_base, scales),
            "prompts": list(ev.prompts), "seeds": list(ev.seeds), "axes": axismod.axis_values(ev),
            "scoring": scoring_request(cfg)}


def lora_strengths(cfg: ExperimentConfig, checkpoints: Sequence[Checkpoint]) -> Dict[str, Strength]:
    """The trained scale of every LoRA checkpoint; warnings (wrong-strength combinations) printed now,
    before anything is rendered."""
    found, warnings = lora_scale.strengths(checkpoints, cfg.lora.rank, cfg.lora.alpha)
    if cfg.eval.backend == "diffusers" and any(s.comfy_strength != s.trained for s in found.values()):
        warnings.append("these LoRA files carry .alpha tensors (lora.format=comfyui): the diffusers backend renders "
                        "them at the trained scale only if diffusers ignores those tensors, which sd3exp has not "
                        "checked; prefer eval.backend=comfyui for them, or lora.format=diffusers")
    for warning in warnings:
        console.warn(warning)
    if found:
        shown = sorted({(round(s.trained, 6), s.source) for s in found.values()})
        console.info("LoRA strength: "
                     + "; ".join(f"alpha/rank = {scale:g} (from {source})" for scale, source in shown))
    return found


def checkpoints_to_render(cfg: ExperimentConfig, run_dir: Path) -> List[Checkpoint]:
    ev = cfg.eval
    final = ev.include_final
    if cfg.stage == "eval" and training_elsewhere(run_dir):
        console.info("training is still running in another process: evaluating the checkpoints finished so far, "
                     "without the final model; evaluate again when it ends (only new cells are rendered)")
        final = False
    found = discover(cfg.paths.training_dir, ev.every_k, ev.min_step, ev.max_step, final)
    for problem in found.problems:
        console.warn(problem)
    if not found.checkpoints:
        raise EvalError(f"no complete checkpoints in {cfg.paths.training_dir}; train first (stage=train)")
    return found.checkpoints


def check_settings(cfg: ExperimentConfig) -> None:
    """The evaluation settings that need no checkpoint or server, checked before anything is touched."""
    ev = cfg.eval
    if not ev.prompts:
        raise ConfigError("eval.prompts", [], "is empty: there is nothing to render",
                          "list the prompts to render, e.g. eval.prompts='[\"k4s4, a castle\"]'")
    if not ev.seeds:
        raise ConfigError("eval.seeds", [], "is empty: there is nothing to render", "e.g. eval.seeds='[0,1]'")
    if ev.backend == "comfyui" and not ev.url:
        raise ConfigError("eval.url", ev.url, "eval.backend=comfyui needs the ComfyUI server's address",
                          "add eval.url=http://127.0.0.1:8188")
    if ev.backend == "comfyui" and not ev.workflow:
        raise ConfigError("eval.workflow", ev.workflow, "eval.backend=comfyui needs an API-format workflow",
                          f"add eval.workflow='${{paths.root_dir}}/conf/workflows/{SHIPPED_WORKFLOWS[cfg.model.type]}'")
    for key, allowed in (("device", DEVICES), ("dtype", DTYPES)):
        if getattr(ev, key) not in allowed:
            raise ConfigError(f"eval.{key}", getattr(ev, key), f"not one of {', '.join(allowed)}",
                              f"use eval.{key}=auto (the best the machine offers)")
    if ev.cell_timeout_s <= 0:
        raise ConfigError("eval.cell_timeout_s", ev.cell_timeout_s, "must be positive", "e.g. eval.cell_timeout_s=600")
    values = axismod.axis_values(ev)
    if ev.backend == "diffusers":
        axismod.check_diffusers(values)
    if ev.backend == "comfyui" and values["shift"] != [None]:
        from sd3exp.evaluate.comfyui.workflow import load_workflow, shift_node, with_inputs

        shift_node(with_inputs(load_workflow(ev.workflow), ev.workflow_inputs), ev.nodes, values["shift"][0])


def variants_of(cfg: ExperimentConfig, checkpoints: Sequence[Checkpoint]) -> Dict[str, List[Variant]]:
    """label -> the axis combinations it is rendered at (a LoRA at every strength, others at none)."""
    values = axismod.axis_values(cfg.eval)
    found = {BASE_LABEL: axismod.variants(values, lora=False)} if cfg.eval.include_base else {}
    return {**found, **{c.label: axismod.variants(values, lora=c.kind == "lora") for c in checkpoints}}


def archive_previous(eval_dir: Path) -> Optional[Path]:
    """Keep an earlier evaluation beside the new one instead of overwriting it."""
    if not (eval_dir.exists() and any(eval_dir.iterdir())):
        return None
    n = 1
    while RunLayout(eval_dir.parent).previous_eval(n).exists():
        n += 1
    kept = eval_dir.rename(RunLayout(eval_dir.parent).previous_eval(n))
    console.info(f"the earlier evaluation was kept as {kept}")
    return kept


def render_job(checkpoints: List[Checkpoint], include_base: bool, all_cells: List[reuse.CellKey],
               reused: Mapping[reuse.CellKey, Cell], strengths: Mapping[str, Strength],
               before: Mapping[str, Any], now: Mapping[str, Any],
               variants: Optional[Mapping[str, List[Variant]]] = None) -> RenderJob:
    """Only the checkpoints with a cell that was not reused are loaded."""
    todo = {key[0] for key in all_cells if key not in reused}
    old = before.get("checkpoints", {})
    changed = {c.label for c in checkpoints if c.label in todo and c.label in old
               and old[c.label][:2] != now["checkpoints"][c.label][:2]}
    return RenderJob([c for c in checkpoints if c.label in todo], include_base and BASE_LABEL in todo,
                     frozenset(reused), {k: v for k, v in strengths.items() if k in todo}, frozenset(changed),
                     {k: v for k, v in (variants or {}).items() if k in todo})


def complete(cells: Sequence[Cell], all_cells: Sequence[reuse.CellKey]) -> bool:
    """Whether an evaluation holds every cell asked for, all of them ok."""
    ok = {cell_key(c) for c in cells if c.status == "ok"}
    return set(all_cells) <= ok and len(cells) == len(all_cells)


def earlier_evaluations(run_dir: Path) -> List[Path]:
    """Evaluations cells may be reused from, newest first: eval/, then eval.previous-N, highest N first."""
    numbered = [p for p in run_dir.glob(f"{RunLayout.EVAL_PREVIOUS}*") if p.name.rsplit("-", 1)[1].isdigit()]
    return [RunLayout(run_dir).eval.folder] + sorted(numbered, key=lambda p: -int(p.name.rsplit("-", 1)[1]))


def reuse_earlier(run_dir: Path, record: dict, prompts: Sequence[str], seeds: Sequence[int],
                  images_dir: Path, variants: Optional[Mapping[str, List[Variant]]] = None
                  ) -> Dict[reuse.CellKey, Cell]:
    """Unchanged good cells of every earlier evaluation (the newest has precedence), placed in images_dir."""
    found: Dict[reuse.CellKey, Cell] = {}
    sources = []
    for folder in earlier_evaluations(run_dir):
        previous, before = reuse.load_previous(folder)
        cells = reuse.reusable(previous, before, record, prompts, seeds, variants)
        new = {k: v for k, v in cells.items() if k not in found}
        found.update(new)
        sources += [f"{len(new)} from {folder.name}"] if new else []
    if found:
        console.info(f"reused {len(found)} unchanged cell(s) ({', '.join(sources)})")
    return reuse.adopt(found, images_dir)


def staging_dir(run_dir: Path) -> Path:
    """A fresh folder the new evaluation is built in; eval/ is replaced only once it has produced
    something. One left by a killed evaluation holds nothing reusable (no cells.json) and goes."""
    staging = RunLayout(run_dir).eval_staging.folder
    if staging.exists():
        shutil.rmtree(staging)
    EvalLayout(staging).images.mkdir(parents=True)
    return staging


def promote(staging: Path, eval_dir: Path) -> None:
    """The new evaluation becomes eval/; the earlier one is kept as eval.previous-N."""
    archive_previous(eval_dir)
    staging.rename(eval_dir)


def evaluate(cfg: ExperimentConfig, run_dir: Path, resume_command: Optional[str] = None) -> Path:
    """Render what is not reusable from earlier evaluations, then grid, cells.json, report.html;
    returns the report's path. Nothing in eval/ is touched until the new evaluation produced cells."""
    ev = cfg.eval
    if ev.backend == "none":
        console.info("eval.backend=none: evaluation skipped")
        return run_dir
    check_settings(cfg)
    eval_dir = RunLayout(run_dir).eval.folder
    check_scoring(cfg)
    checkpoints = checkpoints_to_render(cfg, run_dir)
    strengths = lora_strengths(cfg, checkpoints)
    record = request_record(cfg, checkpoints, strengths)
    variants = variants_of(cfg, checkpoints)
    all_cells = reuse.wanted(list(record["checkpoints"]), ev.prompts, ev.seeds, variants)
    current, before = reuse.load_previous(eval_dir)
    if before == record and complete(current, all_cells) and not unscored_by_models(cfg, current):
        console.info(f"already evaluated with these settings: {EvalLayout(eval_dir).report}")
        print_best(eval_dir)
        return EvalLayout(eval_dir).report
    staging, reused = staging_dir(run_dir), {}
    try:
        with sigterm_raises(Stopped):
            reused = reuse_earlier(run_dir, record, ev.prompts, ev.seeds, EvalLayout(staging).images, variants)
            job = render_job(checkpoints, ev.include_base, all_cells, reused, strengths, before, record, variants)
            rendered = render(cfg, job, run_dir, staging)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Stopped), before or during the sweep
        stop = exc if isinstance(exc, SweepInterrupted) else SweepInterrupted.during(exc, [])
        stop.cells = with_scales(stop.cells, strengths, variants)
        keep_partial(run_dir, staging, all_cells, reused, stop, record, resume_command)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    by_key = {**reused, **{cell_key(c): c for c in rendered}}
    return finish(cfg, run_dir, [by_key[key] for key in all_cells], record, staging, strengths)


def render(cfg: ExperimentConfig, job: RenderJob, run_dir: Path, staging: Path) -> List[Cell]:
    """The job's cells, rendered into staging/images (none when everything was reused)."""
    if not (job.checkpoints or job.include_base):
        return []
    name = "comfyui" if cfg.eval.backend == "comfyui" else "diffusers_backend"  # each offers render()
    backend = importlib.import_module(f"sd3exp.evaluate.{name}")
    return with_scales(backend.render(cfg, job, run_dir, EvalLayout(staging).images), job.strengths, job.variants)


def with_scales(cells: Sequence[Cell], strengths: Mapping[str, Strength],
                variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> List[Cell]:
    """The cells with their axis values (cells.json `axes`) and the LoRA scale each was rendered at
    (`lora_scale`: the trained alpha/rank x the strength multiplier)."""
    named = {(label, v.name): dict(v.axes) for label, vs in (variants or {}).items() for v in vs}
    out = []
    for c in cells:
        axes = named.get((c.label, c.variant), c.axes)
        scale = strengths[c.label].trained * (axes.get("lora_scale") or 1.0) if c.label in strengths else None
        out.append(replace(c, axes=axes, lora_scale=scale if scale is not None else c.lora_scale))
    return out


def keep_partial(run_dir: Path, staging: Path, all_cells: Sequence[reuse.CellKey],
                 reused: Mapping[reuse.CellKey, Cell], stop: SweepInterrupted, record: dict,
                 resume_command: Optional[str]) -> None:
    """Ctrl-C or SIGTERM: record the finished cells (cells.json partial, in grid order) and say how to
    continue."""
    done = {cell_key(c): c for c in stop.cells if c.status == "ok"}
    fsync_all(image_paths(list(done.values())))  # the backends write them unsynced
    by_key = {**reused, **done}
    cells = [by_key[key] for key in all_cells if key in by_key]
    if done:
        cellio.write_cells_json(cells, EvalLayout(staging).cells)
        write_json(EvalLayout(staging).request, record)
        promote(staging, RunLayout(run_dir).eval.folder)
        kept = f"kept {len(done)} newly rendered cell(s) ({len(cells)} in all) in {RunLayout(run_dir).eval.cells}"
    else:
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"no new cell was finished; {RunLayout(run_dir).eval.folder} is unchanged"
    again = resume_command or "the same command"
    raise EvalInterrupted(f"evaluation stopped by {signal.Signals(stop.signum).name}: {kept}. "
                          f"Continue with: {again}", 128 + stop.signum) from stop


def image_paths(cells: Sequence[Cell]) -> List[Path]:
    return [p for c in cells for p in c.paths]


def grids_text(eval_dir: Path, grids: Sequence[Path], most: int = 3) -> str:
    """The grids' paths, or (more than `most`) how many, where, and the first and last name."""
    if len(grids) <= most:
        return ", ".join(str(eval_dir / g.name) for g in grids)
    return f"{len(grids)} grids in {eval_dir} ({grids[0].name} ... {grids[-1].name})"


def finish(cfg: ExperimentConfig, run_dir: Path, cells: List[Cell], record: dict, staging: Path,
           strengths: Optional[Mapping[str, Strength]] = None) -> Path:
    """Grid(s), cells.json, report.html and request.json written in staging, which then becomes eval/."""
    eval_dir = RunLayout(run_dir).eval.folder
    comfy = {label: s.comfy_strength for label, s in (strengths or {}).items()}
    with background(2, "sd3exp-grid") as encode:  # the grids' PNGs encoded while the rest is written
        with synced(image_paths(cells)):  # the renders reach the disk while they are scored and drawn
            cells, choice = choose_best(cfg, run_dir, cells, record, out_dir=staging, strengths=comfy)
            grids = write_grids(cells, staging, cfg.eval.max_grid_pixels, best=best_label(choice),
                                best_variant=best_variant(choice), encode=encode)
        cellio.write_cells_json(cells, EvalLayout(staging).cells)
        write_report(run_dir, cells, grids, out=EvalLayout(staging).report, title=cfg.name)
        write_json(EvalLayout(staging).request, record)
    promote(staging, eval_dir)
    report = EvalLayout(eval_dir).report
    failed = [c for c in cells if c.status != "ok"]
    console.info(f"evaluated {len(cells)} cell(s) ({len(cells) - len(failed)} ok): {grids_text(eval_dir, grids)}")
    console.info(f"report: {report}")
    if choice:
        console.info(summary_line(choice, comfy))
    unscored = unscored_by_models(cfg, cells)
    if unscored:
        raise ScoringFailed(f"the model measures of {unscored} cell(s) could not be computed; see "
                            f"{eval_dir / 'score.log'}. The images are kept: running the same command again "
                            "scores them without rendering")
    if failed:
        first = failed[0]
        raise CellsFailed(f"{len(failed)} of {len(cells)} cells failed, e.g. {first.label} prompt "
                          f"{first.prompt_index} seed {first.seed}: {(first.error or '').strip().rstrip('.')}. "
                          "They are drawn as error tiles in "
                          f"the grid; see {report}. Running the same command again renders only the failed cells")
    return report
