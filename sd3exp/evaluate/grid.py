"""Labelled comparison grids (Pillow), AUTOMATIC1111 X/Y/Z-plot style.

Columns are checkpoints ("step N", "final", "base model"), rows are prompts x
seeds with the prompt text and seed on a left margin. With evaluation axes (strength, CFG, ...;
sd3exp/evaluate/axes.py) the first axis that varies splits each checkpoint into sub-columns
("Strength: 0.5") and every combination of the others is a sheet of its own (grid-sheetN.png,
titled "CFG: 3, Steps: 20"). A failed or missing cell
is drawn as a marked tile with its error text, never dropped. A grid larger
than `max_pixels` is split: per seed first, then into chunks of checkpoints
and prompts. Same inputs, same PNG bytes.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar, Union

from PIL import Image, ImageDraw, ImageFont

from sd3exp.errors import EvalError
from sd3exp.evaluate.axes import AXES, header
from sd3exp.evaluate.cells import Cell, CellKey, cell_image, cell_key, column_title
from sd3exp.io import write_bytes
from sd3exp.layout import EvalLayout

DEFAULT_MAX_PIXELS = 64_000_000
MIN_TILE = 128  # smaller renders (tiny demo models) are scaled up so labels and error text fit
FALLBACK_TILE = (256, 256)
FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
GRID_FILE = re.compile(r"grid(-sheet\d+)?(-seed-?\d+)?(-\d+)?\.png")
ERROR_RED = (200, 30, 30)
ERROR_FILL = (255, 236, 236)
BEST_GREEN = (23, 150, 60)
Font = Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]
T = TypeVar("T")


# ---------------------------------------------------------------- fonts and text


@lru_cache(maxsize=1)
def font_file() -> Optional[str]:
    """A TrueType font on this system (common DejaVu/Arial paths, then fc-match), or None."""
    for candidate in FONT_FILES:
        if Path(candidate).is_file():
            return candidate
    if shutil.which("fc-match") is None:
        return None
    try:
        found = subprocess.run(["fc-match", "-f", "%{file}", "sans"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return found if found.lower().endswith((".ttf", ".otf", ".ttc")) and Path(found).is_file() else None


@lru_cache(maxsize=16)
def font(size: int) -> Font:
    """The system TrueType font at `size` px, else Pillow's built-in font."""
    path = font_file()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def line_height(f: Font) -> int:
    """Pixels from one text line to the next."""
    return math.ceil(f.getbbox("Ag|")[3] * 1.2)


def _pieces(word: str, f: Font, width: float) -> list[str]:
    """A word broken into pieces that each fit `width` (a too-wide single character stays whole)."""
    pieces, piece = [], ""
    for ch in word:
        if piece and f.getlength(piece + ch) > width:
            pieces.append(piece)
            piece = ""
        piece += ch
    return pieces + [piece]


def wrap(text: str, f: Font, width: float) -> list[str]:
    """Lines of `text` no wider than `width` pixels; words longer than a line are broken."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for piece in (p for word in paragraph.split() for p in _pieces(word, f, width)):
            candidate = f"{line} {piece}" if line else piece
            if line and f.getlength(candidate) > width:
                lines.append(line)
                candidate = piece
            line = candidate
        lines.append(line)
    return lines


def fit_lines(lines: list[str], most: int, f: Font, width: float) -> list[str]:
    """At most `most` lines; when cut, the last kept line ends with an ellipsis."""
    if len(lines) <= most:
        return lines
    last = lines[most - 1]
    while last and f.getlength(last + "…") > width:
        last = last[:-1]
    return lines[: most - 1] + [last.rstrip() + "…"]


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], box: tuple[int, int, int, int], f: Font,
                fill: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Lines centred horizontally and vertically in box (x0, y0, x1, y1)."""
    step = line_height(f)
    y = box[1] + (box[3] - box[1] - step * len(lines)) // 2
    for line in lines:
        x = box[0] + (box[2] - box[0] - f.getlength(line)) / 2
        draw.text((round(x), y), line, font=f, fill=fill)
        y += step


# ---------------------------------------------------------------- axes and layout


@dataclass(frozen=True)
class Column:
    """One checkpoint, at one variant; `sub` is the sub-column's "Label: value" header line."""

    label: str
    step: Optional[int]
    variant: str = ""
    sub: str = ""

    @property
    def title(self) -> str:
        return column_title(self.label, self.step) + (f"\n{self.sub}" if self.sub else "")


@dataclass(frozen=True)
class Row:
    """One prompt with one seed."""

    prompt_index: int
    prompt: str
    seed: int


def _unique(items: Sequence[T]) -> list[T]:
    return list(dict.fromkeys(items))


def varying_axes(cells: Sequence[Cell]) -> list[str]:
    """The axes with more than one value among the cells (None, a base model's strength, not counted)."""
    return [a for a in AXES if len({c.axes.get(a) for c in cells} - {None}) > 1]


@dataclass(frozen=True)
class Sheet:
    """One grid's fixed axis values (empty: the only sheet) and its columns."""

    fixed: tuple[tuple[str, object], ...]
    columns: tuple[Column, ...]

    @property
    def title(self) -> str:
        return ", ".join(header(a, v) for a, v in self.fixed)


def sheets(cells: Sequence[Cell]) -> list[Sheet]:
    """A1111's X/Y/Z plot: the first varying axis as sub-columns of each checkpoint, a sheet for each
    combination of the other varying axes (a cell without a value for an axis is on every sheet)."""
    varying = varying_axes(cells)
    sub, rest = (varying[0], varying[1:]) if varying else (None, [])
    fixed_values = _unique([tuple((a, c.axes.get(a)) for a in rest) for c in cells
                            if all(c.axes.get(a) is not None for a in rest)]) or [()]
    found = []
    for fixed in fixed_values:
        on_sheet = [c for c in cells if all(c.axes.get(a) in (v, None) for a, v in fixed)]
        columns = _unique([Column(c.label, c.step, c.variant,
                                  header(sub, c.axes[sub]) if sub and c.axes.get(sub) is not None else "")
                           for c in on_sheet])
        found.append(Sheet(fixed, tuple(columns)))
    return found


def axes(cells: Sequence[Cell]) -> tuple[list[Column], list[Row]]:
    """Columns in order of first appearance; rows by prompt index, then seed in order of appearance."""
    columns = _unique([Column(c.label, c.step, c.variant) for c in cells])
    seeds = _unique([c.seed for c in cells])
    rows = _unique([Row(c.prompt_index, c.prompt, c.seed) for c in cells])
    return columns, sorted(rows, key=lambda r: (r.prompt_index, seeds.index(r.seed)))


@dataclass(frozen=True)
class Layout:
    """Tile size, margins and fonts shared by every grid of one sweep."""

    tile: tuple[int, int]
    font_size: int
    left: int
    header: int
    pad: int

    @property
    def font(self) -> Font:
        return font(self.font_size)

    @property
    def small_font(self) -> Font:
        return font(max(10, self.font_size * 3 // 4))

    def size(self, n_columns: int, n_rows: int) -> tuple[int, int]:
        return self.left + n_columns * self.tile[0], self.header + n_rows * self.tile[1]

    def pixels(self, n_columns: int, n_rows: int) -> int:
        width, height = self.size(n_columns, n_rows)
        return width * height


def make_layout(tile: tuple[int, int], columns: Sequence[Column]) -> Layout:
    """Font size from the tile size; header tall enough for the longest wrapped column title."""
    size = max(12, min(48, (tile[0] + tile[1]) // 25))
    pad = max(4, size // 3)
    f = font(size)
    lines = max((len(wrap(c.title, f, tile[0] - 2 * pad)) for c in columns), default=1)
    return Layout(tile, size, left=12 * size, header=lines * line_height(f) + 2 * pad, pad=pad)


def _open(source: Union[Path, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def tile_size(cells: Sequence[Cell]) -> tuple[int, int]:
    """Size of the first readable image (small ones scaled up to MIN_TILE), or FALLBACK_TILE."""
    for cell in cells:
        source = cell_image(cell)
        if cell.status == "ok" and source is not None:
            try:
                with _open(source) as image:
                    w, h = image.size
            except (OSError, ValueError):
                continue
            scale = max(1, -(-MIN_TILE // min(w, h)))
            return w * scale, h * scale
    return FALLBACK_TILE


# ---------------------------------------------------------------- drawing


def error_tile(message: str, layout: Layout) -> Image.Image:
    """A red-bordered, crossed-out tile showing the (shortened) error text."""
    w, h = layout.tile
    tile = Image.new("RGB", (w, h), ERROR_FILL)
    draw = ImageDraw.Draw(tile)
    line = max(2, min(w, h) // 64)
    draw.line([(0, 0), (w - 1, h - 1)], fill=ERROR_RED, width=line)
    draw.line([(0, h - 1), (w - 1, 0)], fill=ERROR_RED, width=line)
    draw.rectangle([0, 0, w - 1, h - 1], outline=ERROR_RED, width=2 * line)
    f = layout.small_font
    inner = w - 4 * line - 2 * layout.pad
    most = max(1, (h - 4 * line - 2 * layout.pad) // line_height(f))
    text = "ERROR: " + (message.strip().splitlines() or ["(no message)"])[0][:200]
    lines = fit_lines(wrap(text, f, inner), most, f, inner)
    block = line_height(f) * len(lines)
    top = (h - block) // 2
    draw.rectangle([2 * line, top - layout.pad // 2, w - 1 - 2 * line, top + block + layout.pad // 2], fill="white")
    _draw_lines(draw, lines, (0, top, w, top + block), f, ERROR_RED)
    return tile


def cell_tile(cell: Optional[Cell], layout: Layout) -> Image.Image:
    """The cell's image scaled to the tile, or an error tile (failed, unreadable, never rendered)."""
    if cell is None:
        return error_tile("not rendered (no result for this cell)", layout)
    source = cell_image(cell)
    if cell.status != "ok" or source is None:
        return error_tile(cell.error or "no image", layout)
    try:
        with _open(source) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        return error_tile(f"image unreadable: {exc}", layout)
    if rgb.size == layout.tile:
        return rgb
    upscale = rgb.width < layout.tile[0]
    return rgb.resize(layout.tile, Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS)


def _row_label(draw: ImageDraw.ImageDraw, row: Row, top: int, layout: Layout) -> None:
    """Prompt text (wrapped, cut to fit) and seed, centred in the left margin."""
    f, width = layout.font, layout.left - 2 * layout.pad
    most = max(1, (layout.tile[1] - 2 * layout.pad) // line_height(f) - 1)
    lines = fit_lines(wrap(row.prompt, f, width), most, f, width) + [f"seed {row.seed}"]
    _draw_lines(draw, lines, (layout.pad, top, layout.left - layout.pad, top + layout.tile[1]), f)


def render_grid(cells: Mapping[CellKey, Cell], columns: Sequence[Column], rows: Sequence[Row],
                layout: Layout, best: Optional[str] = None, best_variant: Optional[str] = None) -> Image.Image:
    """One grid image; `cells` maps (label, prompt index, seed, variant) to its cell; the `best` column
    (at `best_variant` when given) is framed."""
    image = Image.new("RGB", layout.size(len(columns), len(rows)), "white")
    draw = ImageDraw.Draw(image)
    tw, th = layout.tile
    for i, column in enumerate(columns):
        x = layout.left + i * tw
        lines = wrap(column.title, layout.font, tw - 2 * layout.pad)
        _draw_lines(draw, lines, (x + layout.pad, 0, x + tw - layout.pad, layout.header), layout.font)
    for j, row in enumerate(rows):
        y = layout.header + j * th
        _row_label(draw, row, y, layout)
        for i, column in enumerate(columns):
            cell = cells.get((column.label, row.prompt_index, row.seed, column.variant))
            image.paste(cell_tile(cell, layout), (layout.left + i * tw, y))
    for i, column in enumerate(columns):
        if column.label == best and best_variant in (None, column.variant):
            x, width = layout.left + i * tw, max(3, layout.pad // 2)
            draw.rectangle((x, 0, x + tw - 1, image.height - 1), outline=BEST_GREEN, width=width)
    return image


# ---------------------------------------------------------------- splitting


Piece = tuple[str, list[Column], list[Row]]


def _even_chunks(items: Sequence[T], most: int) -> list[list[T]]:
    """`items` in the fewest chunks of at most `most`, sizes as even as possible."""
    count = math.ceil(len(items) / most)
    size = math.ceil(len(items) / count)
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _chunks(stem: str, columns: Sequence[Column], rows: Sequence[Row], layout: Layout, max_pixels: int) -> list[Piece]:
    """Pieces of at most max_pixels: as many columns per piece as fit, then as many rows."""
    n_columns = min(len(columns), (max_pixels // (layout.header + layout.tile[1]) - layout.left) // layout.tile[0])
    if n_columns < 1:
        raise EvalError(
            f"eval.max_grid_pixels={max_pixels}: too small for even one {layout.tile[0]}x{layout.tile[1]} image "
            f"with its labels ({layout.pixels(1, 1)} pixels); raise it"
        )
    width = layout.size(n_columns, 0)[0]
    n_rows = min(len(rows), (max_pixels // width - layout.header) // layout.tile[1])
    pieces = [(cs, rs) for cs in _even_chunks(columns, n_columns) for rs in _even_chunks(rows, n_rows)]
    return [(f"{stem}.png" if k == 0 else f"{stem}-{k + 1}.png", cs, rs) for k, (cs, rs) in enumerate(pieces)]


def split(columns: Sequence[Column], rows: Sequence[Row], layout: Layout, max_pixels: int) -> list[Piece]:
    """(file name, columns, rows) per grid: one `grid.png` when it fits, else per seed, then chunks."""
    if layout.pixels(len(columns), len(rows)) <= max_pixels:
        return [(EvalLayout.GRID, list(columns), list(rows))]
    seeds = _unique([r.seed for r in rows])
    if len(seeds) == 1:
        return _chunks("grid", columns, rows, layout, max_pixels)
    return [p for s in seeds for p in _chunks(f"grid-seed{s}", columns, [r for r in rows if r.seed == s], layout,
                                              max_pixels)]


def _png(image: Image.Image) -> bytes:
    """Lossless at zlib's fastest level: half the encoding time of Pillow's default (6) for about 15% more
    bytes on a grid of renders (docs/demo-grid.png: 12.5 against 24.4 ms, 154 against 132 KB)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def remove_stale(out_dir: Path, keep: Sequence[Path]) -> None:
    """Delete grid files an earlier sweep left in `out_dir` that this one did not write."""
    for path in out_dir.glob("grid*.png"):
        if GRID_FILE.fullmatch(path.name) and path not in keep:
            path.unlink()


def titled(image: Image.Image, title: str, layout: Layout) -> Image.Image:
    """The grid under a band with the sheet's title (its fixed axis values)."""
    band = line_height(layout.font) + 2 * layout.pad
    out = Image.new("RGB", (image.width, image.height + band), "white")
    ImageDraw.Draw(out).text((layout.pad, layout.pad), title, font=layout.font, fill=(0, 0, 0))
    out.paste(image, (0, band))
    return out


def _write_png(path: Path, image: Image.Image) -> None:
    write_bytes(path, _png(image))


def write_grids(cells: Sequence[Cell], out_dir: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS,
                best: Optional[str] = None, best_variant: Optional[str] = None,
                encode: Optional[Callable[..., Future]] = None) -> list[Path]:
    """Write the comparison grid(s) for `cells` into `out_dir` (atomically), one sheet per combination
    of the axes that are not sub-columns, the `best` checkpoint's column framed; return their paths.

    With `encode` (sd3exp.io.background's submit) each grid is encoded and written there, while the
    next is drawn and after this returns (Pillow releases the GIL while encoding a PNG); its files are
    complete when that work is. At most two drawn grids wait for it (up to 64 MP each)."""
    if not cells:
        raise EvalError("no cells to put in a grid: nothing was rendered")
    out_dir = Path(out_dir)
    _, rows = axes(cells)
    found = sheets(cells)
    layout = make_layout(tile_size(cells), [c for sheet in found for c in sheet.columns])
    by_key = {cell_key(c): c for c in cells}
    written: list[Path] = []
    waiting: deque[Future] = deque()
    for number, sheet in enumerate(found, 1):
        for name, piece_columns, piece_rows in split(list(sheet.columns), rows, layout, max_pixels):
            image = render_grid(by_key, piece_columns, piece_rows, layout, best, best_variant)
            if sheet.fixed:
                image, name = titled(image, sheet.title, layout), name.replace("grid", f"grid-sheet{number}", 1)
            written.append(out_dir / name)
            if encode is None:
                _write_png(written[-1], image)
                continue
            waiting.append(encode(_write_png, written[-1], image))
            while len(waiting) >= 2:
                waiting.popleft().result()
    remove_stale(out_dir, written)
    return written
