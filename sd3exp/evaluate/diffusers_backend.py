"""Render a sweep in-process with diffusers, through the trainer venv's python.

The project venv has no torch: this side writes a JSON job, runs
`sd3exp/workers/render_diffusers.py` with the trainer python (offline), turns
its JSON-lines progress stream into a tqdm bar, and returns one `Cell` per
checkpoint x variant (axis values) x prompt x seed: `render` is the entry every backend offers, `render_cells` takes the
parts. Cells the worker never reported (it crashed or timed out) come back as error cells, never
dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Sequence

from sd3exp import console
from sd3exp.errors import EvalError
from sd3exp.evaluate.axes import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS
from sd3exp.evaluate.cells import (
    BASE_LABEL,
    IMAGE_NAME,
    PLAIN,
    Cell,
    RenderJob,
    Sampling,
    SweepInterrupted,
    Variant,
    cell_key,
)
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.io import write_json
from sd3exp.layout import EvalLayout
from sd3exp.project import WORKERS
from sd3exp.schema import ExperimentConfig
from sd3exp.tinymodel import OFFLINE_ENV

WORKER = WORKERS / "render_diffusers.py"
WAKE_S = 0.2  # longest the main thread waits for a progress line before it looks at signals
PIPE_ARGS = {"steps": "num_inference_steps", "cfg": "guidance_scale"}  # Sampling field -> pipeline argument
T5_TOKENS = 154  # SimpleTuner 4.10.1 trains SD3 with T5 prompts of 154 tokens (models/sd3/model.py)
log = logging.getLogger(__name__)


def job_variant(variant: Variant, trained: Optional[float]) -> dict[str, Any]:
    """One variant for the worker: the LoRA scale (trained x multiplier; None for other checkpoints), its
    pipeline arguments and scheduler (class name and config options; None keeps the pipeline's)."""
    values = dict(variant.axes)
    sampling = {PIPE_ARGS[k]: values[k] for k in ("steps", "cfg") if values.get(k) is not None}
    options = dict(DIFFUSERS_SCHEDULERS[values["scheduler"]]) if values.get("scheduler") else {}
    options |= {"shift": values["shift"]} if values.get("shift") is not None else {}
    sampler = values.get("sampler")
    scheduler = {"class": DIFFUSERS_SAMPLERS[sampler] if sampler else None, "options": options} \
        if sampler or options else None
    scale = None if trained is None else trained * (values.get("lora_scale") or 1.0)
    return {"name": variant.name, "scale": scale, "sampling": sampling, "scheduler": scheduler}


def job_checkpoints(checkpoints: Sequence[Checkpoint], include_base: bool,
                    scales: Optional[Mapping[str, float]] = None,
                    variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> list[dict[str, Any]]:
    """The worker's checkpoint list; the base model (kind "base") first when asked for. Every LoRA
    variant gets its scale (alpha/rank of training, 1.0 when not given, x the strength multiplier)."""
    base: list[dict[str, Any]] = [{"label": BASE_LABEL, "step": None, "kind": "base", "path": None}] if include_base else []
    scales, variants = scales or {}, variants or {}
    entries: list[dict[str, Any]] = base + [{"label": c.label, "step": c.step, "kind": c.kind, "path": str(Path(c.path).resolve())}
                      for c in checkpoints]
    for entry in entries:
        trained = scales.get(entry["label"], 1.0) if entry["kind"] == "lora" else None
        entry["variants"] = [job_variant(v, trained) for v in variants.get(entry["label"], [PLAIN])]
    return entries


def make_job(base: Path, checkpoints: Sequence[Checkpoint], prompts: Sequence[str], seeds: Sequence[int],
             out_dir: Path, sampling: Sampling = Sampling(), include_base: bool = False,
             skip: Collection[tuple[str, int, int, str]] = (), scales: Optional[Mapping[str, float]] = None,
             variants: Optional[Mapping[str, Sequence[Variant]]] = None) -> dict[str, Any]:
    """The worker's job; unset sampling values keep the pipeline's defaults; `skip` lists the
    (label, prompt index, seed, variant) cells not to render; `scales` the LoRA scale per label;
    `variants` the axis combinations per label."""
    return {
        "skip": sorted([list(cell) for cell in skip]),
        "base": str(Path(base).resolve()),
        "max_sequence_length": T5_TOKENS,
        "checkpoints": job_checkpoints(checkpoints, include_base, scales, variants),
        "prompts": list(prompts),
        "seeds": list(seeds),
        "sampling": {PIPE_ARGS.get(k, k): v for k, v in asdict(sampling).items() if v is not None},
        "out_dir": str(Path(out_dir).resolve()),
        "image_name": IMAGE_NAME,
    }


def planned_cells(job: dict[str, Any]) -> list[Cell]:
    """Every cell of the job, checkpoint-major, as an error cell until the worker reports it."""
    skip = {tuple(cell) for cell in job["skip"]}
    return [
        Cell(c["label"], c["step"], i, prompt, seed, "error", error="not rendered: the worker did not report it",
             variant=v["name"])
        for c in job["checkpoints"]
        for v in c["variants"]
        for i, prompt in enumerate(job["prompts"])
        for seed in job["seeds"]
        if (c["label"], i, seed, v["name"]) not in skip
    ]


def parse_line(line: str, job: dict[str, Any]) -> Optional[Cell]:
    """The cell one progress line reports, or None for a line that is not one."""
    try:
        data = json.loads(line)
        return Cell(data["label"], data["step"], data["prompt_index"], job["prompts"][data["prompt_index"]],
                    data["seed"], data["status"], paths=[Path(data["path"])] if data["path"] else [],
                    error=data["error"], seconds=data["seconds"], variant=data.get("variant", ""))
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("ignoring unexpected output from the diffusers worker: %s", line.rstrip()[:200])
        return None


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _lines(stream: Any) -> Iterator[str]:
    """The stream's lines, read by a helper thread: the main thread never blocks in a read for long, so
    Ctrl-C and SIGTERM (which the OS may hand to any thread) are acted on within WAKE_S."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=WAKE_S)
        except queue.Empty:
            continue
        if line is None:
            return
        yield line


def _collect(proc: subprocess.Popen, job: dict[str, Any], bar: console.Bar,
             done: dict[tuple[str, int, int, str], Cell], reported: Callable[[], None] = lambda: None) -> None:
    """Cells into `done` by (label, prompt index, seed, variant) as the worker reports them; `reported` after each."""
    for line in _lines(proc.stdout):
        cell = parse_line(line, job)
        if cell is not None:
            reported()
            done[cell_key(cell)] = cell
            bar.set_postfix_str(f"{cell.label} {cell.status}", refresh=False)  # shown by update, at its pace
            bar.update(1)


class Watchdog:
    """Kills the worker when no cell was reported for `timeout_s` (the first cell's time includes
    loading the pipeline): a per-cell limit, however long the sweep."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float) -> None:
        self.proc, self.timeout_s, self.fired = proc, timeout_s, threading.Event()
        self.timer: Optional[threading.Timer] = None

    def fire(self) -> None:
        self.fired.set()
        self.proc.kill()

    def restart(self) -> None:
        self.cancel()
        self.timer = threading.Timer(self.timeout_s, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def run_worker(job: dict[str, Any], python: Path, job_path: Path, log_path: Path, timeout_s: float,
               progress: bool = True) -> list[Cell]:
    """Run the worker on a job; cells in job order (unreported ones as errors with the log's tail).
    A cell that takes longer than `timeout_s` kills the worker. Ctrl-C or SIGTERM kill it and raise
    SweepInterrupted with the cells it reported."""
    if not Path(python).is_file():
        raise EvalError(f"trainer python {python} does not exist; install the trainer venv (make trainer)")
    write_json(job_path, job)
    cells = planned_cells(job)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log_file, console.progress(
        total=len(cells), unit="cell", desc="diffusers", disable=not progress
    ) as bar:
        proc = subprocess.Popen([str(python), str(WORKER), str(job_path)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log_file, text=True, env={**os.environ, **OFFLINE_ENV})
        watchdog = Watchdog(proc, timeout_s)
        watchdog.restart()
        done: dict[tuple[str, int, int, str], Cell] = {}
        try:
            _collect(proc, job, bar, done, watchdog.restart)
            code = proc.wait()
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the worker goes, its finished cells stay
            raise SweepInterrupted.during(exc, list(done.values())) from exc
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
    if len(done) < len(cells):
        why = f"the diffusers worker exited with code {code} before rendering this cell"
        why += (f" (killed: no cell finished within eval.cell_timeout_s={timeout_s:g} s)"
                if watchdog.fired.is_set() else "")
        cells = [replace(c, error=f"{why}; {log_path}:\n{_tail(log_path)}") for c in cells]
    return [done.get(cell_key(c), c) for c in cells]


def render_cells(base: Path | str, checkpoints: Sequence[Checkpoint], prompts: Sequence[str], seeds: Sequence[int],
           out_dir: Path | str, python: Path | str, sampling: Sampling = Sampling(), include_base: bool = False,
           timeout_s: float = 3600.0, progress: bool = True, skip: Collection[tuple[str, int, int, str]] = (),
           scales: Optional[Mapping[str, float]] = None,
           variants: Optional[Mapping[str, Sequence[Variant]]] = None,
           options: Optional[Mapping[str, Any]] = None) -> list[Cell]:
    """Render checkpoints x variants x prompts x seeds (less `skip`) into `out_dir` (eval/images); one Cell
    each, checkpoint-major.

    The job file and the worker's log go next to `out_dir` (render-job.json, render.log).
    """
    out_dir = Path(out_dir)
    job = {**make_job(Path(base), checkpoints, prompts, seeds, out_dir, sampling, include_base, skip, scales, variants),
           **(options or {})}
    folder = EvalLayout(out_dir.parent)
    return run_worker(job, Path(python), folder.render_job, folder.render_log, timeout_s, progress)


def base_folder(value: str, python: Path) -> Path:
    """model.path as a folder: a local one, or a repo id's snapshot in the user's hub cache (rendering
    is offline); a repo id not in the cache is an error with the download command."""
    from sd3exp.hub import model_fix, model_state

    state = model_state(value, python)
    if state.state in ("local", "cached") and state.folder:
        return Path(state.folder)
    raise EvalError(f"model.path={value!r}: the diffusers evaluation renders from a local folder or the Hugging "
                    f"Face cache, and this model is {state.line()}. Fix: "
                    + (f"download it once: `hf download {value}`; " if state.state != "not_found" else "")
                    + model_fix(state))


def device_options(ev: Any) -> dict[str, Any]:
    """The worker's device settings from eval.*."""
    return {"device": ev.device, "dtype": ev.dtype, "offload": ev.offload, "t5": ev.t5}


def render(cfg: ExperimentConfig, job: RenderJob, run_dir: Path, images: Path) -> list[Cell]:
    """The job's cells rendered by diffusers in the trainer venv, from the base model cfg.model.path
    (a folder or a repo id in the hub cache) on eval.device in eval.dtype."""
    from sd3exp.trainer_env import trainer_for

    ev = cfg.eval
    python = trainer_for(cfg).python
    scales = {label: s.trained for label, s in job.strengths.items()}
    return render_cells(base_folder(cfg.model.path, python), job.checkpoints, ev.prompts, ev.seeds, images, python,
                        Sampling.of(ev), job.include_base, ev.cell_timeout_s, skip=job.skip, scales=scales,
                        variants=job.variants, options=device_options(ev))
