"""The HTML report and cells.json: renders offline, relative links that resolve, escaped text."""

from __future__ import annotations

import io
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import jinja2
import pytest
from PIL import Image

from sd3exp.evaluate.cells import Cell, Resolver, image_name, read_cells_json, write_cells_json
from sd3exp.evaluate.grid import write_grids
from sd3exp.evaluate.report import TEMPLATE, _environment, render_report, report_context, write_report
from sd3exp.io import write_json

EVIL = '<script>alert("x")</script> & a cat'
PLAN = {
    "experiment": "fantasy_art",
    "steps_per_epoch": 794,
    "epochs": 30,
    "max_train_steps": 24000,
    "effective_batch": 6,
    "lr": 1e-5,
    "checkpoint_steps": [800, 1600, 2400],
    "concepts": [{"id": "fantasy", "images": 476, "passes": 10, "samples_per_epoch": 4760, "batches_per_epoch": 794}],
    "warnings": [],
}


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, "PNG")
    return buffer.getvalue()


class Links(HTMLParser):
    """Every href/src and every tag name of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.links += [value for name, value in attrs if name in ("href", "src") and value]


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list[Cell], list[Path]]:
    """A run folder with plan, LR curve, two of the three configs, images, grid and cells."""
    run = tmp_path / "my run"
    write_json(run / "plan.json", PLAN)
    (run / "lr_curve.png").write_bytes(png((0, 0, 0)))
    (run / "config").mkdir()
    (run / "config" / "config.env").write_text("TRAINING_SEED=42\n")
    (run / "config" / "multibackend.json").write_text("[]\n")
    image = run / "eval" / "images" / image_name("checkpoint-100", 0, 0)
    image.parent.mkdir(parents=True)
    image.write_bytes(png((200, 0, 0)))
    cells = [
        Cell("checkpoint-100", 100, 0, EVIL, 0, "ok", paths=[image], seconds=1.25),
        Cell("final", None, 0, EVIL, 0, "error", error="<b>CUDA</b> out of memory", seconds=0.5),
    ]
    grids = write_grids(cells, run / "eval")
    write_cells_json(cells, run / "eval" / "cells.json")
    return run, cells, grids


def page_links(html: str) -> Links:
    parser = Links()
    parser.feed(html)
    return parser


def test_report_renders_with_relative_links_that_exist(run):
    run_dir, cells, grids = run
    path = write_report(run_dir, cells, grids)
    assert path == run_dir / "eval" / "report.html"
    html = path.read_text()
    links = page_links(html).links
    assert "data:," in links  # no favicon request
    files = [link for link in links if link != "data:,"]
    assert {"grid.png", "images/checkpoint-100_p0_s0.png", "../lr_curve.png", "../config/config.env",
            "../config/multibackend.json"} <= set(files)
    for link in files:
        assert "://" not in link and not link.startswith("/")
        assert (path.parent / unquote(link)).is_file(), link
    assert "config/config.json (not in the run folder)" in html


def test_report_shows_plan_cells_and_errors(run):
    html = write_report(*run).read_text()
    for text in ("fantasy_art", "794", "24000", "800, 1600, 2400", "476", "1.2", "error", "step 100", "final"):
        assert text in html


def test_report_escapes_text_and_has_no_scripts(run):
    html = write_report(*run).read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; a cat" in html
    assert "&lt;b&gt;CUDA&lt;/b&gt; out of memory" in html
    assert "script" not in page_links(html).tags


def test_report_without_plan_or_lr_curve(tmp_path):
    cells = [Cell("final", None, 0, "p", 0, "error", error="boom")]
    html = write_report(tmp_path, cells, []).read_text()
    assert "No plan.json" in html and "No lr_curve.png" in html and "No grid was written" in html


def test_template_is_strict(run):
    run_dir, cells, grids = run
    context = report_context(run_dir, cells, grids, run_dir / "eval")
    del context["n_ok"]
    with pytest.raises(jinja2.UndefinedError):
        render_report(context)


def test_cells_json_round_trip(run):
    run_dir, cells, _ = run
    records = (run_dir / "eval" / "cells.json").read_text()
    assert '"images/checkpoint-100_p0_s0.png"' in records and "\\u" not in records
    assert read_cells_json(run_dir / "eval" / "cells.json") == cells


def test_the_report_template_is_compiled_once_not_at_every_evaluation(monkeypatch):
    _environment().get_template(TEMPLATE)  # compiled, or read from the cache
    monkeypatch.setattr(jinja2.Environment, "_parse", lambda *a: pytest.fail("the report template was compiled again"))
    _environment().get_template(TEMPLATE)  # as in the next evaluation's process


def test_the_report_draws_the_lr_curve_from_plan_json_and_again_only_when_plan_json_changed(tmp_path):
    plan = {**PLAN, "schedule": {"scheduler": "cosine"}, "lr_curve": [[0, 1e-5], [12000, 5e-6], [24000, 0.0]]}
    write_json(tmp_path / "plan.json", plan)
    cells = [Cell("final", None, 0, "p", 0, "error", error="boom")]
    assert 'src="../lr_curve.png"' in write_report(tmp_path, cells, []).read_text()
    chart = tmp_path / "lr_curve.png"
    first, drawn_at = chart.read_bytes(), chart.stat().st_mtime_ns
    assert Image.open(chart).size == (800, 360)
    write_report(tmp_path, cells, [])
    assert chart.stat().st_mtime_ns == drawn_at  # plan.json unchanged: not drawn again
    os.utime(chart, ns=(drawn_at - 10**9, drawn_at - 10**9))  # as if drawn a second before plan.json changed
    write_json(tmp_path / "plan.json", {**plan, "checkpoint_steps": [800, 1600]})
    write_report(tmp_path, cells, [])
    assert chart.read_bytes() != first


def test_the_resolver_gives_path_resolve_s_paths(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    (real / "sub").mkdir(parents=True)
    link.symlink_to(real)
    (real / "a.png").write_bytes(b"a")
    (real / "elsewhere.png").write_bytes(b"e")
    (real / "sub" / "b.png").symlink_to(real / "elsewhere.png")  # a file that is itself a link
    resolve = Resolver()
    for path in [link / "a.png", link / "sub" / "b.png", link / "missing.png", link / "sub" / "..", link / ".",
                 Path("relative.png"), link / "a.png"]:
        assert resolve(path) == path.resolve(), path
