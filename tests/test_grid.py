"""Comparison grids: geometry, error tiles, wrapped labels, the giant-image guard."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sd3exp.errors import EvalError
from sd3exp.evaluate import grid
from sd3exp.evaluate.cells import Cell
from sd3exp.evaluate.grid import Column, Layout, Row, axes, fit_lines, make_layout, split, wrap, write_grids
from sd3exp.io import background

TILE = (192, 144)  # at least grid.MIN_TILE, so tiles keep the images' own size
COLUMNS = [("checkpoint-100", 100), ("checkpoint-200", 200), ("final", None), ("base", None)]
PROMPTS = ["a cat on a windowsill in the afternoon sun, highly detailed photograph", "a dog"]


def png(color: tuple[int, int, int], size: tuple[int, int] = TILE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def color_of(column: int, prompt: int, seed: int) -> tuple[int, int, int]:
    return (40 * column + 10, 100 + 60 * prompt, 50 + seed)


def make_cells(seeds=(0,), fail=None) -> list[Cell]:
    """Cells for COLUMNS x PROMPTS x seeds; `fail` = (label, prompt index, seed) of a failed one."""
    cells = []
    for c, (label, step) in enumerate(COLUMNS):
        for p, prompt in enumerate(PROMPTS):
            for seed in seeds:
                if (label, p, seed) == fail:
                    cells.append(Cell(label, step, p, prompt, seed, "error", error="CUDA out of memory\ntraceback..."))
                else:
                    cells.append(Cell(label, step, p, prompt, seed, "ok", images=[png(color_of(c, p, seed))]))
    return cells


def layout_for(cells: list[Cell]) -> Layout:
    return make_layout(TILE, axes(cells)[0])


def tile_at(image: Image.Image, layout: Layout, column: int, row: int) -> Image.Image:
    x, y = layout.left + column * TILE[0], layout.header + row * TILE[1]
    return image.crop((x, y, x + TILE[0], y + TILE[1]))


def test_grid_is_columns_by_rows_plus_margins(tmp_path):
    cells = make_cells(seeds=(0, 7))
    [path] = write_grids(cells, tmp_path)
    layout = layout_for(cells)
    image = Image.open(path).convert("RGB")
    assert path == tmp_path / "grid.png"
    assert layout.left > 0 and layout.header > 0
    assert image.size == (layout.left + 4 * TILE[0], layout.header + 4 * TILE[1])
    rows = [(p, s) for p in range(2) for s in (0, 7)]  # prompt-major, seeds in order
    for c in range(4):
        for r, (p, s) in enumerate(rows):
            assert tile_at(image, layout, c, r).getcolors() == [(TILE[0] * TILE[1], color_of(c, p, s))]
    corner = image.crop((0, 0, layout.left, layout.header))
    assert corner.getcolors() == [(layout.left * layout.header, (255, 255, 255))]
    assert image.crop((0, layout.header, layout.left, image.height)).convert("L").getextrema()[0] < 100  # labels


def test_axes_and_column_titles():
    columns, rows = axes(make_cells(seeds=(7, 0)))
    assert [c.title for c in columns] == ["step 100", "step 200", "final", "base model"]
    assert [(r.prompt_index, r.seed) for r in rows] == [(0, 7), (0, 0), (1, 7), (1, 0)]


def _is_red(pixel: tuple[int, int, int]) -> bool:
    return pixel == grid.ERROR_RED


def test_failed_missing_and_unreadable_cells_are_marked_tiles(tmp_path):
    cells = make_cells(fail=("final", 1, 0))
    cells = [c for c in cells if (c.label, c.prompt_index) != ("base", 0)]  # never reported
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cells[0] = Cell("checkpoint-100", 100, 0, PROMPTS[0], 0, "ok", paths=[broken])
    [path] = write_grids(cells, tmp_path / "eval")
    layout = layout_for(cells)
    image = Image.open(path).convert("RGB")
    assert image.size == layout.size(4, 2)
    for column, row in [(2, 1), (3, 0), (0, 0)]:
        tile = tile_at(image, layout, column, row)
        assert _is_red(tile.getpixel((1, 1))) and _is_red(tile.getpixel((TILE[0] - 2, TILE[1] - 2)))
        assert any(_is_red(color) for _, color in tile.crop((8, 8, TILE[0] - 8, TILE[1] - 8)).getcolors(1 << 16))
    assert tile_at(image, layout, 1, 0).getcolors() == [(TILE[0] * TILE[1], color_of(1, 0, 0))]


def test_error_tile_shows_the_first_error_line():
    layout = Layout((400, 300), 16, 192, 30, 5)
    tile = grid.error_tile("boom: disk full\nTraceback A", layout)
    assert tile.size == (400, 300)
    assert tile.tobytes() == grid.error_tile("boom: disk full\nTraceback B", layout).tobytes()
    assert tile.tobytes() != grid.error_tile("boom: out of memory", layout).tobytes()


def test_wrap_fits_width_and_breaks_long_words():
    font = grid.font(14)
    text = "a photo of " + "x" * 80 + " in the afternoon sun"
    lines = wrap(text, font, 120)
    assert len(lines) > 3
    assert all(font.getlength(line) <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert wrap("one\ntwo", font, 500) == ["one", "two"]


def test_fit_lines_ends_a_cut_text_with_an_ellipsis():
    font = grid.font(14)
    lines = wrap("word " * 60, font, 100)
    cut = fit_lines(lines, 3, font, 100)
    assert len(cut) == 3 and cut[-1].endswith("…") and font.getlength(cut[-1]) <= 100
    assert fit_lines(lines[:2], 3, font, 100) == lines[:2]


def test_long_column_labels_are_wrapped_into_a_taller_header():
    narrow = (64, 48)
    short = make_layout(narrow, [Column("checkpoint-1", 1)])
    long = make_layout(narrow, [Column("a-finetune-with-a-very-long-name-and-no-step", None)])
    assert long.header >= short.header + 2 * grid.line_height(grid.font(short.font_size))


def test_split_per_seed_when_too_big(tmp_path):
    cells = make_cells(seeds=(0, 7))
    layout = layout_for(cells)
    limit = layout.pixels(4, 2)
    paths = write_grids(cells, tmp_path, max_pixels=limit)
    assert [p.name for p in paths] == ["grid-seed0.png", "grid-seed7.png"]
    for path in paths:
        width, height = Image.open(path).size
        assert (width, height) == layout.size(4, 2) and width * height <= limit


def test_split_into_chunks_with_one_seed(tmp_path):
    cells = make_cells()
    layout = layout_for(cells)
    limit = layout.pixels(2, 2)
    paths = write_grids(cells, tmp_path, max_pixels=limit)
    assert [p.name for p in paths] == ["grid.png", "grid-2.png"]
    assert all(Image.open(p).size == layout.size(4, 1) for p in paths)  # every checkpoint side by side
    assert layout.pixels(4, 1) <= limit


def test_too_small_a_limit_is_an_error(tmp_path):
    cells = make_cells()
    with pytest.raises(EvalError, match="max_grid_pixels"):
        write_grids(cells, tmp_path, max_pixels=layout_for(cells).pixels(1, 1) - 1)


@settings(max_examples=60, deadline=None)
@given(n_columns=st.integers(1, 12), n_prompts=st.integers(1, 6), n_seeds=st.integers(1, 3),
       limit_tiles=st.integers(1, 80))
def test_split_pieces_fit_and_cover_every_cell_once(n_columns, n_prompts, n_seeds, limit_tiles):
    layout = Layout(TILE, 12, 100, 30, 4)
    columns = [Column(f"checkpoint-{i}", i) for i in range(n_columns)]
    rows = [Row(p, f"prompt {p}", s) for p in range(n_prompts) for s in range(n_seeds)]
    limit = layout.pixels(1, 1) + (limit_tiles - 1) * TILE[0] * TILE[1]
    pieces = split(columns, rows, layout, limit)
    seen = [(c, r) for _, cs, rs in pieces for c in cs for r in rs]
    assert sorted(seen, key=repr) == sorted(((c, r) for c in columns for r in rows), key=repr)
    assert all(layout.pixels(len(cs), len(rs)) <= limit for _, cs, rs in pieces)
    assert len({name for name, _, _ in pieces}) == len(pieces)


def test_output_is_deterministic_and_atomic(tmp_path):
    cells = make_cells(seeds=(0, 7), fail=("base", 0, 7))
    first = write_grids(cells, tmp_path / "a")[0].read_bytes()
    second = write_grids(cells, tmp_path / "b")[0].read_bytes()
    assert first == second
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid.png"]


def test_grids_encoded_in_the_background_are_the_same_files(tmp_path):
    """Split into four pieces, each encoded on a background thread while the next is drawn: the same
    names and bytes as drawn and written one after another, all complete when the background work is;
    never more than two drawn pieces waiting to be encoded."""
    cells = make_cells(seeds=(0, 7))
    limit = layout_for(cells).pixels(2, 2)
    alone = write_grids(cells, tmp_path / "a", max_pixels=limit)
    waiting, most = [], []
    with background(4, "test-grid") as submit:
        def counted(fn, *args):
            future = submit(fn, *args)
            waiting.append(future)
            most.append(sum(not f.done() for f in waiting))
            return future

        paths = write_grids(cells, tmp_path / "b", max_pixels=limit, encode=counted)
    assert [p.name for p in paths] == [p.name for p in alone] and len(paths) == 4
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in alone]
    assert max(most) <= 2


def test_a_background_encoding_error_is_raised(tmp_path):
    cells = make_cells()
    (tmp_path / "grid.png").mkdir()  # the grid cannot be renamed into place
    with pytest.raises(OSError):
        with background(2, "test-grid") as submit:
            write_grids(cells, tmp_path, encode=submit)


def test_stale_grids_from_an_earlier_sweep_are_removed(tmp_path):
    for name in ("grid-2.png", "grid-seed3.png", "notes-grid.png"):
        (tmp_path / name).write_bytes(b"old")
    assert write_grids(make_cells(), tmp_path) == [tmp_path / "grid.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "notes-grid.png"]


def test_default_font_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr(grid, "font_file", lambda: None)
    grid.font.cache_clear()
    try:
        [path] = write_grids(make_cells(), tmp_path)
        assert Image.open(path).size == layout_for(make_cells()).size(4, 2)
    finally:
        grid.font.cache_clear()


def test_no_readable_image_uses_the_fallback_tile(tmp_path):
    cells = [Cell("checkpoint-1", 1, 0, "p", 0, "error", error="boom")]
    [path] = write_grids(cells, tmp_path)
    layout = make_layout(grid.FALLBACK_TILE, axes(cells)[0])
    assert Image.open(path).size == layout.size(1, 1)


def test_no_cells_is_an_error(tmp_path):
    with pytest.raises(EvalError):
        write_grids([], Path(tmp_path))


def test_tiny_renders_are_scaled_up_to_readable_tiles(tmp_path):
    cells = [Cell("checkpoint-1", 1, 0, "p", 0, "ok", images=[png((10, 20, 30), (8, 8))]),
             Cell("checkpoint-2", 2, 0, "p", 0, "error", error="CUDA out of memory")]
    assert grid.tile_size(cells) == (grid.MIN_TILE, grid.MIN_TILE)
    [path] = write_grids(cells, tmp_path)
    layout = make_layout((grid.MIN_TILE, grid.MIN_TILE), axes(cells)[0])
    assert Image.open(path).size == layout.size(2, 1)
