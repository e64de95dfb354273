"""The sweep: every checkpoint x variant x prompt x seed queued on one ComfyUI server, watched until settled.

Images come back through /view, named exactly as the websocket's `executed` events list them (else
as /history does); a unique filename_prefix per sweep keeps ComfyUI's cache from returning old files.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

from sd3exp import console
from sd3exp.errors import EvalError
from sd3exp.evaluate.cells import Cell, CellSpec, Sampling, SweepInterrupted, Variant, image_name, plan_cells
from sd3exp.evaluate.checkpoints import BASE_LABEL, Checkpoint, Kind
from sd3exp.evaluate.comfyui.client import ComfyClient, Submitted, Watcher
from sd3exp.evaluate.comfyui.names import LINK_FIX, closest, listed_names, match_names, norm_name
from sd3exp.evaluate.comfyui.protocol import ImageRef, Outcome, parse_history
from sd3exp.evaluate.comfyui.workflow import (
    LOADERS,
    Edit,
    Graph,
    base_workflow,
    cell_edits,
    filename_prefix,
    find_nodes,
    new_sweep_id,
    patch_graph,
    shift_node,
)
from sd3exp.io import write_bytes

log = logging.getLogger(__name__)


def _cell(spec: CellSpec, **fields: Any) -> Cell:
    c = spec.checkpoint
    return Cell(c.label, c.step, spec.prompt_index, spec.prompt, spec.seed, variant=spec.variant.name, **fields)


@dataclass(frozen=True)
class SweepSpec:
    """What to render: checkpoints x prompts x seeds through one workflow."""

    workflow: Graph
    checkpoints: Sequence[Checkpoint]
    model_names: Mapping[str, str]  # checkpoint label -> name ComfyUI lists (links.comfy_name)
    prompts: Sequence[str]
    seeds: Sequence[int] = (0,)
    sampling: Sampling = Sampling()
    nodes: Mapping[str, str] = field(default_factory=dict)  # eval.nodes overrides
    sweep_id: str = field(default_factory=new_sweep_id)
    include_base: bool = False  # a first column from the workflow's own model (LoRA loader bypassed)
    skip: Collection[tuple[str, int, int, str]] = ()  # (label, prompt index, seed, variant) not to render
    strengths: Mapping[str, float] = field(default_factory=dict)  # LoRA label -> strength_model (lora_scale)
    variants: Mapping[str, Sequence[Variant]] = field(default_factory=dict)  # label -> axis combinations
    names_fix: str = LINK_FIX  # the fix named when ComfyUI cannot load a checkpoint's name


def resolve_names(
    client: ComfyClient, checkpoints: Sequence[Checkpoint], expected: Mapping[str, str], fix: str = LINK_FIX
) -> dict[str, str]:
    """label -> server spelling, per loader kind; EvalError (ending with `fix`) before anything is queued."""
    resolved: dict[str, str] = {}
    for kind in sorted({c.kind for c in checkpoints}):
        wanted = {c.label: expected[c.label] for c in checkpoints if c.kind == kind}
        resolved |= match_names(wanted, client.model_names(kind), LOADERS[kind][0], fix)
    return resolved


class _Sweep:
    """State of one running sweep: queued prompts, finished cells, progress."""

    bar: console.Bar  # set by run_sweep once the names are known to be loadable

    def __init__(self, client: ComfyClient, spec: SweepSpec, save_dir: Optional[Path]) -> None:
        self.client, self.spec, self.save_dir = client, spec, save_dir
        self.nodes = {k: find_nodes(spec.workflow, k, spec.nodes) for k in {c.kind for c in spec.checkpoints}}
        self.graphs = {k: spec.workflow for k in self.nodes}
        checkpoints = list(spec.checkpoints)
        if spec.include_base:
            self.graphs["base"] = base_workflow(spec.workflow, spec.nodes)
            self.nodes["base"] = find_nodes(self.graphs["base"], "base", spec.nodes)
            checkpoints.insert(0, Checkpoint(None, BASE_LABEL, "base", Path()))
        skip = set(spec.skip)
        self.cells = [c for c in plan_cells(checkpoints, spec.prompts, spec.seeds, spec.variants)
                      if (c.checkpoint.label, c.prompt_index, c.seed, c.variant.name) not in skip]
        self.results: dict[int, Cell] = {}
        self.queued: dict[str, int] = {}  # prompt_id -> cell index, until settled
        self.last_done = time.monotonic()

    def setup(self, index: int, names: Mapping[str, str]) -> tuple[Kind, list[Edit]]:
        """The cell's loader kind and the inputs set for it (eval.shift's on ModelSamplingSD3 among them)."""
        cell = self.cells[index]
        kind = cell.checkpoint.kind
        strength = self.spec.strengths.get(cell.checkpoint.label)
        if strength is not None:
            strength *= cell.variant.value("lora_scale") or 1.0
        sampling = cell.variant.sampling(self.spec.sampling)
        edits = cell_edits(self.nodes[kind], cell, names[cell.checkpoint.label],
                           filename_prefix(self.spec.sweep_id, cell), sampling, strength)
        if sampling.shift is not None:
            edits.append(("shift", shift_node(self.graphs[kind], self.spec.nodes, sampling.shift), "shift",
                          sampling.shift))
        return kind, edits

    def graph(self, index: int, names: Mapping[str, str]) -> Graph:
        kind, edits = self.setup(index, names)
        return patch_graph(self.graphs[kind], edits)

    def base_name(self) -> dict[str, str]:
        """{"base": the server's spelling of the workflow's own unet_name}, when the base is rendered."""
        if "base" not in self.nodes:
            return {}
        loader = self.nodes["base"].loader
        name = str(self.graphs["base"][loader]["inputs"].get("unet_name"))
        available = self.client.model_names("base")
        by_norm = {norm_name(n): n for n in available}
        if norm_name(name) in by_norm:
            return {BASE_LABEL: by_norm[norm_name(name)]}
        near = closest(name, available)
        fix = f"add {shlex.quote(f'++eval.workflow_inputs.{loader}.unet_name={near[0]}')} (or another of those)" \
            if near else f"put {name} into ComfyUI's models/diffusion_models folder"
        raise EvalError(
            f"eval.include_base: the workflow's base model {name!r} (node {loader} unet_name) is not one of "
            f"ComfyUI's {len(available)} diffusion models; closest: {near[:5]}. Fix: {fix}, or add "
            "eval.include_base=false")

    def queue_all(self, names: Mapping[str, str]) -> None:
        graphs = [self.graph(i, names) for i in range(len(self.cells))]  # all patch errors before queueing
        for index, graph in enumerate(graphs):
            sent = self.client.queue_prompt(graph)
            if sent.problem is None and sent.prompt_id is not None:
                self.queued[sent.prompt_id] = index
                continue
            if sent.prompt_id:  # 200 with node_errors: part of it was queued anyway
                self.client.cancel([sent.prompt_id])
            if index == 0:
                self.refuse_workflow(sent, names)
            self.record(index, _cell(self.cells[index], error=sent.problem, prompt_id=sent.prompt_id))

    def refuse_workflow(self, sent: Submitted, names: Mapping[str, str]) -> None:
        """The first cell refused for names no cell sets (the workflow's VAE or text encoders, say): every
        cell would be, so EvalError (with the names ComfyUI lists) before anything else is queued."""
        patched = {(node, key) for _, node, key, value in self.setup(0, names)[1] if value is not None}
        if not sent.refused or any(r.kind != "value_not_in_list" or (r.node, r.input_name) in patched
                                   for r in sent.refused):
            return
        fixes = []
        for r in sent.refused:
            listed = listed_names(self.client.get_json(f"/object_info/{r.class_type}"), r.class_type, r.input_name)
            near = closest(str(r.value), listed)[:1]
            fixes += [f"add {shlex.quote(f'++eval.workflow_inputs.{r.node}.{r.input_name}={n}')} (the closest name; "
                      f"ComfyUI lists {', '.join(listed[:10])}{' ...' if len(listed) > 10 else ''})" for n in near] or \
                [f"put the file node {r.node} ({r.class_type}) loads into ComfyUI's models folder (it lists no "
                 f"{r.input_name})"]
        raise EvalError(f"{sent.problem}. Nothing was queued: every cell uses these inputs of eval.workflow. "
                        f"Fix: {'; '.join(fixes)}")

    def record(self, index: int, cell: Cell) -> None:
        self.results[index] = cell
        self.bar.set_postfix_str(f"{cell.label} {cell.status}", refresh=False)  # shown by update, at its pace
        self.bar.update(1)

    def finish(self, prompt_id: str, watcher: Watcher) -> None:
        """Record a settled prompt: its outcome as the websocket told it, else as /history has it."""
        index = self.queued.pop(prompt_id)
        spec = self.cells[index]
        save = self.nodes[spec.checkpoint.kind].save
        outcome = watcher.outcome(prompt_id, save) or self.history_outcome(prompt_id, save)
        now = time.monotonic()
        seconds = outcome.seconds if outcome.seconds is not None else now - self.last_done
        cell = _cell(spec, prompt_id=prompt_id, seconds=seconds, error=outcome.error)
        self.last_done = now
        if outcome.ok:
            self.download(cell, outcome.images)
        self.record(index, cell)

    def history_outcome(self, prompt_id: str, save_node: str) -> Outcome:
        entry = self.client.history(prompt_id)
        if entry is None:
            return Outcome(False, error="ComfyUI lost the prompt: in neither /queue nor /history (restarted?)")
        return parse_history(entry, save_node)

    def download(self, cell: Cell, images: Sequence[ImageRef]) -> None:
        try:
            for image in images:
                self.keep(cell, image, self.client.view(image))
        except EvalError as exc:
            cell.error = str(exc)
            return
        cell.status = "ok"

    def keep(self, cell: Cell, image: ImageRef, data: bytes) -> None:
        cell.files.append(f"{image.subfolder}/{image.filename}".lstrip("/"))
        if self.save_dir is None:
            cell.images.append(data)
            return
        path = self.save_dir / image_name(cell.label, cell.prompt_index, cell.seed, len(cell.paths), cell.variant)
        write_bytes(path, data, sync=False)  # while ComfyUI works on the next; durable before named (io.synced)
        cell.paths.append(path)

    def expire(self, timeout_s: float) -> None:
        """Cancel what is still queued and mark it timed out."""
        self.client.cancel(list(self.queued))
        for prompt_id, index in sorted(self.queued.items(), key=lambda kv: kv[1]):
            self.record(index, _cell(self.cells[index], prompt_id=prompt_id, error=f"timed out after {timeout_s:g} s"))
        self.queued.clear()


def _wait(sweep: _Sweep, watcher: Watcher, deadline: float) -> None:
    while sweep.queued:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for prompt_id in watcher.settled(list(sweep.queued), min(left, 1.0)):
            sweep.finish(prompt_id, watcher)


def _cancel_quietly(client: ComfyClient, prompt_ids: Sequence[str]) -> None:
    """Best-effort cleanup on Ctrl-C: a failure is logged, the interrupt still propagates."""
    try:
        client.cancel(prompt_ids)
    except EvalError as exc:
        log.warning("could not cancel queued ComfyUI prompts %s: %s", list(prompt_ids), exc)


def run_sweep(
    client: ComfyClient,
    spec: SweepSpec,
    save_dir: Optional[Path] = None,
    timeout_s: float = 3600.0,
    poll_s: float = 0.5,
    progress: bool = True,
) -> list[Cell]:
    """Render the cells; one Cell per checkpoint x prompt x seed not in spec.skip, checkpoint-major.

    Model names are checked against /object_info before anything is queued. Images are written to
    `save_dir` as they come, named by cell (cells.image_name), not fsynced (sd3exp.io.synced before anything
    names them); without it they are kept in the cells. Ctrl-C (or Stopped) deletes our queued prompts and
    interrupts ours running, then raises SweepInterrupted with the cells finished so far.
    """
    deadline = time.monotonic() + timeout_s
    sweep = _Sweep(client, spec, save_dir)  # workflow problems surface before any request
    names = resolve_names(client, spec.checkpoints, spec.model_names, spec.names_fix) | sweep.base_name()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    with console.progress(total=len(sweep.cells), unit="cell", desc="comfyui", disable=not progress) as sweep.bar:
        watcher = Watcher(client, poll_s)
        try:
            sweep.queue_all(names)
            _wait(sweep, watcher, deadline)
        except KeyboardInterrupt as exc:
            _cancel_quietly(client, list(sweep.queued))
            raise SweepInterrupted.during(exc, [sweep.results[i] for i in sorted(sweep.results)]) from exc
        finally:
            watcher.close()
        if sweep.queued:
            sweep.expire(timeout_s)
    return [sweep.results[i] for i in range(len(sweep.cells))]
