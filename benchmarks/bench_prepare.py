"""Benchmark: sd3exp prepare (materialized, hard links) against the source's byte-copying script.

The baseline is written like the source workflow's script: copy every image R
times with shutil.copy2, split each caption on ',' or '.', keep N tags and
shuffle the rest with the unseeded global random, write name_<i>.txt. Both run
on the same generated folder; the table shows wall time, bytes written, extra
disk used (blocks of new inodes) and the time of a re-run with nothing changed.

    python benchmarks/bench_prepare.py [--images 500] [--repeats 10] [--keep 2] [--side 512]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

from PIL import Image

from sd3exp.prepare import human_bytes, prepare
from sd3exp.schema import CaptionsConfig, ConceptConfig, DatasetConfig, ExperimentConfig


def make_source(folder: Path, images: int, side: int) -> None:
    """Random-noise PNGs (incompressible, about 3 x side^2 bytes) with 12-tag captions."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(images):
        Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(
            folder / f"img{i:04d}.png", compress_level=0)
        tags = ", ".join(f"tag{rng.randrange(200)}" for _ in range(10))
        (folder / f"img{i:04d}.txt").write_text(f"k4s4, style, {tags}", encoding="utf-8")


def source_style(src: Path, out: Path, repeats: int, keep: int) -> int:
    """The source workflow's script, rewritten: R byte copies, unseeded shuffles. Returns bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    images = [f for f in os.listdir(src) if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    for i in range(repeats):
        for image in images:
            stem, ext = os.path.splitext(image)
            caption = src / f"{stem}.txt"
            if not caption.exists():
                print(f"Warning: no caption for {image}")
                continue
            shutil.copy2(src / image, out / f"{stem}_{i + 1}{ext}")
            tokens = [t.strip() for t in re.split(r"[,.]", caption.read_text().strip()) if t.strip()]
            rest = tokens[keep:]
            random.shuffle(rest)
            text = ", ".join(tokens[:keep] + rest)
            (out / f"{stem}_{i + 1}.txt").write_text(text)
            written += (src / image).stat().st_size + len(text.encode())
    return written


def extra_disk(folder: Path, src: Path) -> int:
    """Bytes of disk blocks held by files under folder that the source folder does not share."""
    shared = {p.stat().st_ino for p in src.iterdir()}
    seen, total = set(), 0
    for p in folder.rglob("*"):
        st = p.lstat()
        if p.is_file() and st.st_ino not in shared and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def timed(fn: Callable[[], int]) -> Tuple[float, int]:
    start = time.perf_counter()
    written = fn()
    return time.perf_counter() - start, written


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "inf"


def table(rows: List[Tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (PNG of ~3 x side^2 bytes)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.workdir))
    try:
        src = work / "src"
        make_source(src, args.images, args.side)
        size = sum(p.stat().st_size for p in src.iterdir())
        print(f"{args.images} images ({human_bytes(size)}), {args.repeats} repeats, keep {args.keep}; in {work}")
        base_time, base_bytes = timed(lambda: source_style(src, work / "baseline", args.repeats, args.keep))
        base_disk = extra_disk(work / "baseline", src)
        rerun_base, _ = timed(lambda: source_style(src, work / "baseline", args.repeats, args.keep))
        concept = ConceptConfig(id="bench", path=str(src), trigger="k4s4", repeats=args.repeats,
                                captions=CaptionsConfig(shuffle=True, keep_tags=args.keep, mode="materialized"))
        cfg = ExperimentConfig(concepts=[concept], dataset=DatasetConfig(prepared_dir=str(work / "prepared")))
        ours_time, ours_bytes = timed(lambda: prepare(cfg, progress=False).total("bytes_written"))
        ours_disk = extra_disk(work / "prepared", src)
        rerun_ours, _ = timed(lambda: prepare(cfg, progress=False).total("bytes_written"))
        print(table([
            ("", "source script", "sd3exp prepare", "ratio"),
            ("wall time", f"{base_time:.2f} s", f"{ours_time:.2f} s", ratio(base_time, ours_time)),
            ("bytes written", human_bytes(base_bytes), human_bytes(ours_bytes), ratio(base_bytes, ours_bytes)),
            ("extra disk used", human_bytes(base_disk), human_bytes(ours_disk), ratio(base_disk, ours_disk)),
            ("re-run, no change", f"{rerun_base:.2f} s", f"{rerun_ours:.2f} s", ratio(rerun_base, rerun_ours)),
        ]))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
