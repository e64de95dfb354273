"""Benchmark: sd3exp prepare against the source's byte-copying script and `cp -al`, side by side.

The baseline is written like the source workflow's script: copy every image R
times with shutil.copy2, split each caption on ',' or '.', keep N tags and
shuffle the rest with the unseeded global random, write name_<i>.txt. Rows (issue 23):

- materialized prepare of --images-large 64-px images (default 20,000) at R repeats vs the script (goal >= 5x faster),
  and vs the floor: the same 400,000 hard links and caption files made by bare system calls in one loop
- materialized prepare of --images 512-px images (default 500) vs the script (goal >= 20x faster), with bytes
  written and extra disk used
- native prepare of the large set vs `cp -al` (goal <= 3x slower)
- `python -m sd3exp stage=prepare` on the large set, first and again with nothing changed (goal < 5 s)

Every set is generated in a temporary folder (removed after); $XDG_CACHE_HOME points there too.
Nothing is deleted until every row has run (about 7 GB at the defaults): on ext4 without a journal,
creating files is up to 30x slower for a minute or more after many were deleted (the kernel skips
recently freed inodes one by one), so deleting one row's output would slow the next row down.

    python benchmarks/bench_prepare.py [--images 500] [--side 512] [--images-large 20000] [--repeats 10] [--keep 2]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

from PIL import Image

from sd3exp.prepare import human_bytes, prepare
from sd3exp.project import ROOT
from sd3exp.schema import CaptionsConfig, ConceptConfig, DatasetConfig, ExperimentConfig


def make_source(folder: Path, images: int, side: int) -> None:
    """Random-noise PNGs (incompressible, about 3 x side^2 bytes) with 12-tag captions."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(images):
        Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(
            folder / f"img{i:05d}.png", compress_level=0)
        tags = ", ".join(f"tag{rng.randrange(200)}" for _ in range(10))
        (folder / f"img{i:05d}.txt").write_text(f"k4s4, style, {tags}", encoding="utf-8")


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


def creation_floor(src: Path, out: Path, repeats: int) -> int:
    """The least a materialized prepare can do: the same R hard links and R caption files per image (each
    caption the source's bytes), by bare system calls in one loop. Returns bytes written."""
    out.mkdir(parents=True)
    folder, written = os.open(out, os.O_RDONLY), 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        for image in sorted(p for p in src.iterdir() if p.suffix == ".png"):
            caption = image.with_suffix(".txt").read_bytes()
            for i in range(1, repeats + 1):
                os.link(image, f"{image.stem}_{i}.png", dst_dir_fd=folder)
                fd = os.open(f"{image.stem}_{i}.txt", flags, 0o666, dir_fd=folder)
                written += os.write(fd, caption)
                os.close(fd)
    finally:
        os.close(folder)
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


def table(rows: List[Tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def config(src: Path, prepared: Path, repeats: int, keep: int, mode: str) -> ExperimentConfig:
    concept = ConceptConfig(id="bench", path=str(src), trigger="k4s4", repeats=repeats,
                            captions=CaptionsConfig(shuffle=True, keep_tags=keep, mode=mode))
    return ExperimentConfig(concepts=[concept], dataset=DatasetConfig(prepared_dir=str(prepared)))


def against_script(work: Path, src: Path, repeats: int, keep: int) -> dict:
    """Materialized prepare and the source's script on `src`: times, bytes written, extra disk, re-runs.
    Their folders are left in `work` (see the module's docstring)."""
    out = {}
    baseline, prepared = work / f"baseline-{src.name}", work / f"prepared-{src.name}"
    out["base"], out["base_bytes"] = timed(lambda: source_style(src, baseline, repeats, keep))
    out["base_disk"] = extra_disk(baseline, src)
    out["base_rerun"], _ = timed(lambda: source_style(src, baseline, repeats, keep))
    cfg = config(src, prepared, repeats, keep, "materialized")
    out["ours"], out["ours_bytes"] = timed(lambda: prepare(cfg, progress=False).total("bytes_written"))
    out["ours_disk"] = extra_disk(prepared, src)
    out["ours_rerun"], _ = timed(lambda: prepare(cfg, progress=False).total("bytes_written"))
    out["floor"], _ = timed(lambda: creation_floor(src, work / f"floor-{src.name}", repeats))
    return out


def cli_prepare(work: Path, src: Path, repeats: int) -> float:
    """Seconds of `python -m sd3exp stage=prepare` (audit, cache key and prepare) on `src`, materialized."""
    args = ["experiment=fantasy_art", f"concepts.0.path={src}", "concepts.0.num_images=null",
            f"concepts.0.repeats={repeats}", "concepts.0.captions.mode=materialized", "stage=prepare",
            f"hydra.run.dir={work / 'run'}", f"paths.output_root={work / 'out'}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sd3exp", *args], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "XDG_CACHE_HOME": str(work / "xdg")})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (PNG of ~3 x side^2 bytes)")
    parser.add_argument("--images-large", type=int, default=20000, help="the large set, of 64-px images")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.workdir))
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg")  # prepare()'s notes too: a first run, as a user's
    try:
        small, large = work / "src", work / "large"
        make_source(small, args.images, args.side)
        make_source(large, args.images_large, 64)
        print(f"{args.images} images of {args.side} px ({human_bytes(sum(p.stat().st_size for p in small.iterdir()))}), "
              f"{args.images_large} of 64 px; {args.repeats} repeats, keep {args.keep}; load {os.getloadavg()[0]:.1f}; "
              f"in {work}")
        big = against_script(work, large, args.repeats, args.keep)
        few = against_script(work, small, args.repeats, args.keep)
        cp_time, _ = timed(lambda: subprocess.run(["cp", "-al", str(large), str(work / "cp")], check=True).returncode)
        native_cfg = config(large, work / "native", args.repeats, args.keep, "native")
        native_time, _ = timed(lambda: prepare(native_cfg, progress=False).total("bytes_written"))
        first, again = cli_prepare(work, large, args.repeats), cli_prepare(work, large, args.repeats)
        n = args.images_large
        print(table([
            ("", "baseline", "sd3exp", "ratio", "goal"),
            (f"materialized, {n} x 64 px, R={args.repeats}", f"{big['base']:.2f} s", f"{big['ours']:.2f} s",
             ratio(big["base"], big["ours"]) + " faster", ">= 5x faster"),
            ("  images/s", f"{n / big['base']:.0f}", f"{n / big['ours']:.0f}", "", ""),
            ("  the same files by bare system calls", f"{big['floor']:.2f} s", f"{big['ours']:.2f} s",
             ratio(big["ours"], big["floor"]) + " the floor", ""),
            (f"materialized, {args.images} x {args.side} px", f"{few['base']:.2f} s", f"{few['ours']:.2f} s",
             ratio(few["base"], few["ours"]) + " faster", ">= 20x faster"),
            ("  bytes written", human_bytes(few["base_bytes"]), human_bytes(few["ours_bytes"]),
             ratio(few["base_bytes"], few["ours_bytes"]), ""),
            ("  extra disk used", human_bytes(few["base_disk"]), human_bytes(few["ours_disk"]),
             ratio(few["base_disk"], few["ours_disk"]), ""),
            ("  re-run, no change", f"{few['base_rerun']:.2f} s", f"{few['ours_rerun']:.2f} s",
             ratio(few["base_rerun"], few["ours_rerun"]), ""),
            (f"native, {n} images (baseline cp -al)", f"{cp_time:.2f} s", f"{native_time:.2f} s",
             ratio(native_time, cp_time) + " slower", "<= 3x slower"),
            (f"stage=prepare, {n}, first / again", "", f"{first:.2f} s / {again:.2f} s", "", "again < 5 s"),
        ]))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
