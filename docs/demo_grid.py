"""Copy the demo's evaluation grid into the README's picture, docs/demo-grid.png.

    make demo-grid                                   # runs the demo (if needed), then this
    python docs/demo_grid.py [RUN_FOLDER] [OUT_PNG]  # default: outputs/demo, docs/demo-grid.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MAX_WIDTH = 900


def main(argv: list[str]) -> int:
    run = Path(argv[0]) if argv else ROOT / "outputs" / "demo"
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "demo-grid.png"
    grid = run / "eval" / "grid.png"
    if not grid.is_file():
        print(f"error: {grid} not found; run the demo first: make demo", file=sys.stderr)
        return 1
    with Image.open(grid) as img:
        picture = img.convert("RGB")
    if picture.width > MAX_WIDTH:
        picture = picture.resize((MAX_WIDTH, round(picture.height * MAX_WIDTH / picture.width)), Image.LANCZOS)
    tmp = out.with_name(f".{out.name}.tmp")
    picture.quantize(colors=128, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
    tmp.replace(out)
    print(f"wrote {out} ({picture.width}x{picture.height}, {out.stat().st_size // 1024} KB) from {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
