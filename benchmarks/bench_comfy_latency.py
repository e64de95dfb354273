"""ComfyUI evaluation speed against the test stand-in server, side by side in one run.

Default: throughput. sd3exp's evaluation (`evaluate`: the sweep, images stored, grid, cells.json,
report; scoring off, as the baseline scores nothing) versus a raw loop (benchmarks/comfy_raw_loop.py:
POST /prompt, websocket, GET /view, files written) replaying the very graphs sd3exp sent. Each runs
in a fresh Python (timed after its imports) against a fresh instant stand-in (no sampling time) in
this process, at 10, 50 and 100 cells: a line through them gives the per-cell and the fixed cost.
`--url URL --models DIR`: the same against a ComfyUI you run (DIR: its models folder, where each trial's
LoRA links are made and then removed), with the shipped LoRA workflow's SaveImage fed by an EmptyImage
node, so that the server renders nothing (the loaders and sampler are left unconnected: not run).

`--latency`: from the last image being ready on the server to the grid being written, sd3exp
versus the source write-up's loop (queue everything, count PNGs in the output folder every 5 s).

Run: `.venv/bin/python benchmarks/bench_comfy_latency.py` (add `--latency` for the second; `--url
http://127.0.0.1:8188 --models /path/to/ComfyUI/models` for a real ComfyUI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.comfy_standin is not part of the package

from sd3exp.evaluate.cells import Cell, plan_cells  # noqa: E402
from sd3exp.evaluate.checkpoints import Checkpoint  # noqa: E402
from sd3exp.evaluate.comfyui import (  # noqa: E402
    ComfyClient,
    SweepSpec,
    cell_edits,
    find_nodes,
    load_workflow,
    new_sweep_id,
    patch_graph,
    run_sweep,
)
from sd3exp.evaluate.grid import write_grids  # noqa: E402
from tests.comfy_standin import StandIn  # noqa: E402
from tests.helpers import compose_experiment  # noqa: E402
from tests.test_eval_cli import fake_lora_run  # noqa: E402

WORKFLOW = load_workflow(ROOT / "conf/workflows/sd3_api.json")
PROMPTS = ["k4s4, a castle", "k4s4, a dragon"]
SOURCE_POLL_S = 5.0
BASE_UNET = "sd3_medium_transformer.safetensors"

# ---------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Server:
    """The ComfyUI both approaches render on: its URL, its models folder, the workflow sd3exp is given."""

    url: str
    models: Path
    workflow: Optional[Path] = None  # None: the shipped LoRA workflow


@contextlib.contextmanager
def instant(folder: Path, models: Path) -> Iterator[Server]:
    """A fresh stand-in that renders instantly (no sampling time, no history lag)."""
    with StandIn(folder, models_dir=models, unet_names=[BASE_UNET], delay_s=0.0, history_lag_s=0.0) as server:
        yield Server(server.url, models)


def instant_workflow(path: Path) -> Path:
    """The shipped LoRA workflow with its SaveImage fed by a 64-px EmptyImage: a real ComfyUI runs only the
    nodes an output depends on, so it renders nothing, and sd3exp still patches every node it patches."""
    graph = load_workflow(ROOT / "conf/workflows/sd3_lora_api.json")
    save = next(i for i, node in graph.items() if node["class_type"] == "SaveImage")
    graph["sd3exp_bench_empty"] = {"class_type": "EmptyImage",
                                   "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x333333}}
    graph[save]["inputs"]["images"] = ["sd3exp_bench_empty", 0]
    path.write_text(json.dumps(graph))
    return path


@contextlib.contextmanager
def rendering(work: Path, models: Path, real: Optional[Server]) -> Iterator[Server]:
    """`real`, or a fresh instant stand-in in `work`."""
    if real is not None:
        yield real
        return
    with instant(work / "comfy", models) as server:
        yield server


def child(approach: str, work: Path, *args: str) -> float:
    """Run one approach in a fresh Python (nothing warmed up) against the stand-in in this process;
    the seconds it took after its imports."""
    out = subprocess.run([sys.executable, __file__, "--child", approach, str(work), *args], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def ours(work: Path, checkpoints: int, prompts: int, real: Optional[Server]) -> tuple[float, list[dict[str, Any]]]:
    """Seconds for `stage=eval`'s evaluate() on a fresh run of checkpoints x prompts LoRA cells;
    the graphs it sent, in order (from /history)."""
    run = work / f"run-{uuid.uuid4().hex[:8]}"  # its links' folder in the models folder
    fake_lora_run(run, steps=tuple(range(2, 2 * checkpoints + 1, 2)))
    texts = json.dumps([f"k4s4, subject {i}" for i in range(prompts)])
    with rendering(work, work / "models", real) as server:
        workflow = [f"eval.workflow={server.workflow}"] if server.workflow else []
        cfg = compose_experiment("demo_lora", [
            "demo=false", "concepts.0.num_images=16", "eval.backend=comfyui", f"eval.url={server.url}",
            f"eval.models_dir={server.models}", "eval.include_final=false", "eval.include_base=false",
            "eval.scoring.enabled=false", "tracking.mlflow.enabled=false", f"eval.prompts={texts}", *workflow],
            str(run))
        (work / "cfg.pickle").write_bytes(pickle.dumps(cfg))
        try:
            seconds = child("sd3exp", work, str(run))
        finally:
            if real is not None:  # the links sd3exp made in that ComfyUI's models folder (its graph never loads them)
                shutil.rmtree(server.models / "loras" / run.name, ignore_errors=True)
        cells = json.loads((run / "eval" / "cells.json").read_text())
        assert len(cells) == checkpoints * prompts and all(c["status"] == "ok" for c in cells)
        with requests.Session() as session:
            graphs = [session.get(f"{server.url}/history/{c['prompt_id']}").json()[c["prompt_id"]]["prompt"][2]
                      for c in cells]
    return seconds, graphs


def raw(work: Path, models: Path, graphs: list[dict[str, Any]], real: Optional[Server]) -> float:
    """Seconds for the raw loop to render `graphs` (on a fresh stand-in, or `real`) and write the files."""
    (work / "graphs.json").write_text(json.dumps(graphs))
    with rendering(work, models, real) as server:
        seconds = child("raw", work, server.url)
    assert len(list((work / "images").iterdir())) == len(graphs)
    return seconds


def run_child(approach: str, work: Path, arg: str) -> None:
    """In the child: import, then time the approach alone; prints the seconds."""
    if approach == "sd3exp":
        from sd3exp.evaluate.comfyui import render  # noqa: F401 (the backend stage=eval imports)
        from sd3exp.evaluate.stage import evaluate

        cfg = pickle.loads((work / "cfg.pickle").read_bytes())
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            started = time.perf_counter()
            evaluate(cfg, Path(arg))
    else:
        from benchmarks.comfy_raw_loop import raw_loop

        graphs = json.loads((work / "graphs.json").read_text())
        started = time.perf_counter()
        raw_loop(arg, graphs, work / "images")
    print(time.perf_counter() - started)


def throughput(sizes: tuple[int, ...], repeats: int, real: Optional[Server]) -> None:
    """Seconds per approach at each size (n checkpoints x 10 prompts), the two in alternating order;
    an untimed evaluation first gives the graphs the raw loop replays. A least-squares line through
    every trial gives ms/cell (slope) and the fixed cost (intercept)."""
    times: dict[str, list[tuple[int, float]]] = {"sd3exp": [], "raw": []}
    for checkpoints in sizes:
        with tempfile.TemporaryDirectory() as warm:
            graphs = ours(Path(warm), checkpoints, 10, real)[1]
            for rep in range(repeats):
                for name in ("sd3exp", "raw") if rep % 2 == 0 else ("raw", "sd3exp"):
                    with tempfile.TemporaryDirectory() as work:
                        seconds = ours(Path(work), checkpoints, 10, real)[0] if name == "sd3exp" else \
                            raw(Path(work), Path(warm) / "models", graphs, real)
                    times[name].append((10 * checkpoints, seconds))
    largest = 10 * max(sizes)
    where = f"the ComfyUI at {real.url} (instant workflow)" if real else "instant stand-in ComfyUI on 127.0.0.1"
    print(f"{where}, {', '.join(str(10 * s) for s in sizes)} cells, {repeats} trials "
          f"each; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':8} {'cells/s':>9} {'ms/cell':>9} {'fixed (s)':>10}   (cells/s: median at {largest} cells)")
    rates = {}
    for name, points in times.items():
        slope, intercept = statistics.linear_regression([float(n) for n, _ in points], [t for _, t in points])
        rates[name] = largest / statistics.median(t for n, t in points if n == largest)
        print(f"{name:8} {rates[name]:9.1f} {slope * 1000:9.1f} {intercept:10.2f}")
    print(f"sd3exp's rate / the raw loop's: {rates['sd3exp'] / rates['raw']:.0%}")


# ---------------------------------------------------------------- latency


def checkpoints(n: int) -> list[Checkpoint]:
    return [Checkpoint(800 * i, f"checkpoint-{800 * i}", "full", Path(f"/out/{i}")) for i in range(1, n + 1)]


def names(ckpts: list[Checkpoint]) -> dict[str, str]:
    return {c.label: f"run/{c.label}.safetensors" for c in ckpts}


def latency_ours(server: StandIn, ckpts: list[Checkpoint], grid_dir: Path) -> float:
    """Seconds between the last image being written and the grid of every image being on disk."""
    cells = run_sweep(ComfyClient(server.url), SweepSpec(WORKFLOW, ckpts, names(ckpts), PROMPTS), progress=False)
    assert all(c.status == "ok" for c in cells), [c.error for c in cells]
    write_grids(cells, grid_dir)
    return time.monotonic() - max(server.ready_at.values())


def latency_source(server: StandIn, ckpts: list[Checkpoint], grid_dir: Path) -> float:
    """The write-up's loop: POST every prompt, count PNGs in the output folder every 5 s, then paste them."""
    client, sweep_id = ComfyClient(server.url), new_sweep_id()
    nodes = find_nodes(WORKFLOW, "full")
    for cell in plan_cells(ckpts, PROMPTS, [0]):
        label = cell.checkpoint.label
        prefix = f"{sweep_id}/{label}_p{cell.prompt_index}"
        client.queue_prompt(patch_graph(WORKFLOW, cell_edits(nodes, cell, names(ckpts)[label], prefix)))
    folder, expected = server.output_dir / sweep_id, len(ckpts) * len(PROMPTS)
    while len(list(folder.glob("*.png"))) < expected:
        time.sleep(SOURCE_POLL_S)
    cells = [Cell(c.checkpoint.label, c.checkpoint.step, c.prompt_index, c.prompt, c.seed, "ok",
                  paths=sorted(folder.glob(f"{c.checkpoint.label}_p{c.prompt_index}_*.png")))
             for c in plan_cells(ckpts, PROMPTS, [0])]
    write_grids(cells, grid_dir)
    return time.monotonic() - max(server.ready_at.values())


def trial(approach: Callable[[StandIn, list[Checkpoint], Path], float], delay_s: float, n_checkpoints: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        ckpts = checkpoints(n_checkpoints)
        with StandIn(Path(out) / "comfy", unet_names=list(names(ckpts).values()), delay_s=delay_s) as server:
            return approach(server, ckpts, Path(out) / "grid")


def latency(n_checkpoints: int, delays: list[float]) -> None:
    rows = [(d, trial(latency_ours, d, n_checkpoints), trial(latency_source, d, n_checkpoints)) for d in delays]
    print(f"{n_checkpoints} checkpoints x {len(PROMPTS)} prompts, stand-in ComfyUI on 127.0.0.1")
    print(f"{'s/image':>8} {'sd3exp (ms)':>12} {'source, 5 s folder poll (ms)':>30} {'ratio':>8}")
    for delay, a, b in rows:
        print(f"{delay:8.2f} {a * 1000:12.1f} {b * 1000:30.1f} {b / a:8.0f}x")
    a, b = statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows)
    print(f"{'median':>8} {a * 1000:12.1f} {b * 1000:30.1f} {b / a:8.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15,
                        help="throughput: trials per size and approach (a 100-cell run takes 0.3 s: 5 trials swing by 8-17 points)")
    parser.add_argument("--latency", action="store_true", help="measure latency against 5-s folder polling instead")
    parser.add_argument("--checkpoints", type=int, default=3, help="latency: checkpoints (x 2 prompts)")
    parser.add_argument("--delays", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85],
                        help="latency: seconds per image on the server, one trial each (spreads the 5 s polling phase)")
    parser.add_argument("--url", help="throughput against this ComfyUI instead of the stand-in (with --models)")
    parser.add_argument("--models", type=Path, help="that ComfyUI's models folder (LoRA links made and removed)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]), args.child[2])
    elif args.latency:
        latency(args.checkpoints, args.delays)
    elif args.url:
        if args.models is None:
            parser.error("--url needs --models, the models folder of that ComfyUI")
        with tempfile.TemporaryDirectory() as folder:
            real = Server(args.url.rstrip("/"), args.models, instant_workflow(Path(folder) / "instant_lora_api.json"))
            throughput((1, 5, 10), args.repeats, real)
    else:
        throughput((1, 5, 10), args.repeats, None)


if __name__ == "__main__":
    main()
