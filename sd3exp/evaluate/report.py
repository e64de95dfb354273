"""The sweep's HTML report: grids, every cell, the experiment's plan and configs.

`<run>/eval/report.html` opens from disk: only relative links, no scripts, no
external resources. Rendered with Jinja (StrictUndefined, autoescape on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import quote

import jinja2

from sd3exp.evaluate.cells import Cell, Resolver, cell_image, column_title
from sd3exp.io import read_json, write_text
from sd3exp.layout import EvalLayout, RunLayout
from sd3exp.project import TEMPLATES

TEMPLATE = "report.html.j2"


def href(target: Path, page_dir: Path, resolve: Callable[[Path], Path] = Path.resolve) -> str:
    """A URL-quoted relative link from a page in `page_dir` to `target`."""
    return quote(Path(os.path.relpath(resolve(Path(target)), resolve(Path(page_dir)))).as_posix())


def _link(target: Path, page_dir: Path) -> dict[str, Any]:
    return {"name": target.name, "href": href(target, page_dir), "exists": target.is_file()}


def cell_row(cell: Cell, page_dir: Path, resolve: Callable[[Path], Path] = Path.resolve) -> dict[str, Any]:
    """One table row: what was rendered, how long it took, how it went."""
    source = cell_image(cell)
    return {
        "checkpoint": column_title(cell.label, cell.step) + (f" {cell.variant}" if cell.variant else ""),
        "label": cell.label,
        "prompt_index": cell.prompt_index,
        "prompt": cell.prompt,
        "seed": cell.seed,
        "seconds": f"{cell.seconds:.1f}",
        "status": cell.status,
        "error": cell.error,
        "image": href(source, page_dir, resolve) if isinstance(source, Path) and source.is_file() else None,
        "scores": {name: f"{value:.4g}" for name, value in cell.scores.items()},
        "memorised": cell.memorised,
    }


def read_plan(run_dir: Path) -> Optional[dict[str, Any]]:
    """The experiment's plan.json, or None when the run folder has none."""
    path = RunLayout(run_dir).plan
    return read_json(path) if path.is_file() else None


def report_context(run_dir: Path, cells: Sequence[Cell], grids: Sequence[Path], page_dir: Path,
                   title: Optional[str] = None) -> dict[str, Any]:
    """Everything the template shows, links relative to `page_dir`."""
    plan, resolve = read_plan(run_dir), Resolver()
    lr_curve = RunLayout(run_dir).lr_curve
    return {
        "title": title or (plan or {}).get("experiment") or run_dir.name,
        "grids": [_link(g, page_dir) for g in grids],
        "cells": [cell_row(c, page_dir, resolve) for c in cells],
        "n_ok": sum(c.status == "ok" for c in cells),
        "n_error": sum(c.status != "ok" for c in cells),
        "total_seconds": f"{sum(c.seconds for c in cells):.1f}",
        "plan": plan,
        "lr_curve": _link(lr_curve, page_dir) if lr_curve.is_file() else None,
        **scoring_context(page_dir, page_dir),  # the evaluation the page is written into (eval.next/ or eval/)
        "configs": [_link(run_dir / name, page_dir) | {"name": name} for name in RunLayout.COMPILED],
    }


def scoring_context(eval_dir: Path, page_dir: Path) -> dict[str, Any]:
    """The chosen checkpoint (eval/best.json) and the score plot, when the evaluation was scored."""
    from sd3exp.evaluate.score import read_best

    folder = EvalLayout(eval_dir)
    plots = {"score_plot": folder.scores_plot, "training_plot": folder.training_plot}
    best = read_best(eval_dir)
    return {"best": best, "score_digits": score_digits(best),
            **{k: _link(p, page_dir) if p.is_file() else None for k, p in plots.items()}}


def score_digits(best: Optional[dict[str, Any]]) -> dict[str, int]:
    """Per measure, the significant digits that tell the rows of the best-checkpoint table apart."""
    from sd3exp.evaluate.digits import digits

    rows = ([best["best"]] if best["best"] else []) + best["runners_up"] + best["excluded"] if best else []
    return {name: digits(r["scores"][name] for r in rows if name in r["scores"]) for name in (best or {}).get("measures", {})}


def _environment() -> jinja2.Environment:
    """Compiled templates are kept in Jinja's per-user cache folder (keyed by their source): compiling
    the report's took 0.12 s of every evaluation."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              autoescape=True, keep_trailing_newline=True,
                              bytecode_cache=jinja2.FileSystemBytecodeCache())


def render_report(context: dict[str, Any]) -> str:
    """The report's HTML text."""
    return _environment().get_template(TEMPLATE).render(**context)


def write_report(run_dir: Path | str, cells: Sequence[Cell], grids: Sequence[Path], out: Optional[Path | str] = None,
                 title: Optional[str] = None) -> Path:
    """Write `<run>/eval/report.html` (or `out`) atomically; return its path."""
    run_dir = Path(run_dir)
    out = Path(out) if out else RunLayout(run_dir).eval.report
    if RunLayout(run_dir).lr_curve_outdated():  # shown here: drawn here, when plan.json changed
        from sd3exp.plots import draw_lr_curve  # matplotlib (0.2 s to import) only when there is a chart to draw

        draw_lr_curve(run_dir)
    write_text(out, render_report(report_context(run_dir, cells, grids, out.parent, title)))
    return out
