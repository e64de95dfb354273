"""Latency from the last image being ready on the server to the grid being written.

sd3exp's sweep (websocket `executing` + /history + /view) versus the source
write-up's approach (queue everything, then look at ComfyUI's output folder
every 5 s until the expected number of PNGs is there), both against the test
stand-in server; both then write the grid with the same grid writer, so the
difference is the waiting. Run: `.venv/bin/python benchmarks/bench_comfy_latency.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.comfy_standin is not part of the package

from sd3exp.evaluate.cells import Cell, plan_cells  # noqa: E402
from sd3exp.evaluate.checkpoints import Checkpoint  # noqa: E402
from sd3exp.evaluate.comfyui import (  # noqa: E402
    ComfyClient,
    SweepSpec,
    find_nodes,
    load_workflow,
    new_sweep_id,
    patch_graph,
    run_sweep,
)
from sd3exp.evaluate.grid import write_grids  # noqa: E402
from tests.comfy_standin import StandIn  # noqa: E402

WORKFLOW = load_workflow(ROOT / "conf/workflows/sd3_api.json")
PROMPTS = ["k4s4, a castle", "k4s4, a dragon"]
SOURCE_POLL_S = 5.0


def checkpoints(n: int) -> list[Checkpoint]:
    return [Checkpoint(800 * i, f"checkpoint-{800 * i}", "full", Path(f"/out/{i}")) for i in range(1, n + 1)]


def names(ckpts: list[Checkpoint]) -> dict[str, str]:
    return {c.label: f"run/{c.label}.safetensors" for c in ckpts}


def ours(server: StandIn, ckpts: list[Checkpoint], grid_dir: Path) -> float:
    """Seconds between the last image being written and the grid of every image being on disk."""
    cells = run_sweep(ComfyClient(server.url), SweepSpec(WORKFLOW, ckpts, names(ckpts), PROMPTS), progress=False)
    assert all(c.status == "ok" for c in cells), [c.error for c in cells]
    write_grids(cells, grid_dir)
    return time.monotonic() - max(server.ready_at.values())


def source(server: StandIn, ckpts: list[Checkpoint], grid_dir: Path) -> float:
    """The write-up's loop: POST every prompt, count PNGs in the output folder every 5 s, then paste them."""
    client, sweep_id = ComfyClient(server.url), new_sweep_id()
    nodes = find_nodes(WORKFLOW, "full")
    for cell in plan_cells(ckpts, PROMPTS, [0]):
        label = cell.checkpoint.label
        prefix = f"{sweep_id}/{label}_p{cell.prompt_index}"
        client.queue_prompt(patch_graph(WORKFLOW, nodes, cell, names(ckpts)[label], prefix))
    folder, expected = server.output_dir / sweep_id, len(ckpts) * len(PROMPTS)
    while len(list(folder.glob("*.png"))) < expected:
        time.sleep(SOURCE_POLL_S)
    cells = [Cell(c.checkpoint.label, c.checkpoint.step, c.prompt_index, c.prompt, c.seed, "ok",
                  paths=sorted(folder.glob(f"{c.checkpoint.label}_p{c.prompt_index}_*.png")))
             for c in plan_cells(ckpts, PROMPTS, [0])]
    write_grids(cells, grid_dir)
    return time.monotonic() - max(server.ready_at.values())


def trial(approach, delay_s: float, n_checkpoints: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        ckpts = checkpoints(n_checkpoints)
        with StandIn(Path(out) / "comfy", unet_names=list(names(ckpts).values()), delay_s=delay_s) as server:
            return approach(server, ckpts, Path(out) / "grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85],
                        help="seconds per image on the server, one trial each (spreads the 5 s polling phase)")
    args = parser.parse_args()
    rows = [(d, trial(ours, d, args.checkpoints), trial(source, d, args.checkpoints)) for d in args.delays]
    print(f"{args.checkpoints} checkpoints x {len(PROMPTS)} prompts, stand-in ComfyUI on 127.0.0.1")
    print(f"{'s/image':>8} {'sd3exp (ms)':>12} {'source, 5 s folder poll (ms)':>30} {'ratio':>8}")
    for delay, a, b in rows:
        print(f"{delay:8.2f} {a * 1000:12.1f} {b * 1000:30.1f} {b / a:8.0f}x")
    a, b = statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows)
    print(f"{'median':>8} {a * 1000:12.1f} {b * 1000:30.1f} {b / a:8.0f}x")


if __name__ == "__main__":
    main()
