"""Benchmark: stage=caption through the stand-in OpenAI-compatible server, 1 vs N workers.

The stand-in (tests/openai_standin.py, real HTTP on 127.0.0.1) answers every
request after a fixed delay, standing in for a GPU server's generation time, so
the table shows how well the thread pool hides that latency. Each run starts from
an empty caption store; a last run with the store full shows the cost of a re-run
where everything is reused (hashing + lookups, no requests).

    python benchmarks/bench_caption.py [--images 200] [--delay 0.05] [--workers 1 8] [--side 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sd3exp.caption.run import caption  # noqa: E402
from sd3exp.schema import CaptionerConfig, ConceptConfig, ExperimentConfig  # noqa: E402
from tests.openai_standin import State, serve  # noqa: E402


def make_images(folder: Path, n: int, side: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(folder / f"img{i:04d}.png")


def one_run(src: Path, store: Path, url: str, workers: int) -> tuple:
    cfg = ExperimentConfig(concepts=[ConceptConfig(id="bench", path=str(src), trigger="k4s4")],
                           captioner=CaptionerConfig(url=url, workers=workers, out_dir=str(store)))
    start = time.perf_counter()
    summary = caption(cfg, again="(benchmark)", progress=False, echo=lambda line: None)
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the server takes per request")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--side", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sd3exp-bench-caption-") as tmp, serve(State(delay_s=args.delay)) as (url, st):
        src = Path(tmp) / "src"
        make_images(src, args.images, args.side)
        print(f"{args.images} images ({args.side}x{args.side} PNG), server delay {args.delay * 1000:.0f} ms/request")
        print(f"{'workers':>8} {'seconds':>8} {'images/s':>9} {'requests':>9} {'speed-up':>9}")
        base = None
        for workers in args.workers:
            st.requests.clear()
            seconds, summary = one_run(src, Path(tmp) / f"store-{workers}", url, workers)
            assert summary.captioned == args.images and not summary.failures
            base = base or seconds
            print(f"{workers:>8} {seconds:>8.2f} {args.images / seconds:>9.1f} {len(st.requests):>9} "
                  f"{base / seconds:>8.1f}x")
        st.requests.clear()
        seconds, summary = one_run(src, Path(tmp) / f"store-{args.workers[-1]}", url, args.workers[-1])
        print(f"re-run, all reused: {seconds:.2f} s, {len(st.requests)} requests, {summary.reused} reused")


if __name__ == "__main__":
    main()
