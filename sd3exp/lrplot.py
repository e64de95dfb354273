"""The planned LR-against-step chart (run folder's lr_curve.png), checkpoints marked; drawn by sd3exp.plots.

It is drawn where it is shown, the report, from the run folder's plan.json, and again only when
plan.json changed (compile rewrites plan.json only when the plan changed): a compile loads no
plotting library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sd3exp.io import read_json, write_bytes
from sd3exp.layout import RunLayout


def render_plan(plan: dict) -> bytes:
    """PNG bytes of a plan.json's LR curve (byte-identical for the same plan)."""
    from sd3exp.plots import lr_curve  # matplotlib only when a chart is drawn

    return lr_curve(plan["lr_curve"], plan["checkpoint_steps"], f"{plan['experiment']}: {plan['schedule']['scheduler']}")


def draw(run_dir: Path) -> Optional[Path]:
    """Draw `<run>/lr_curve.png` from `<run>/plan.json` when it is missing or older than plan.json;
    its path (None when the run folder has no plan.json)."""
    layout = RunLayout(run_dir)
    if not layout.plan.is_file():
        return None
    if not layout.lr_curve.is_file() or layout.lr_curve.stat().st_mtime_ns < layout.plan.stat().st_mtime_ns:
        write_bytes(layout.lr_curve, render_plan(read_json(layout.plan)))
    return layout.lr_curve
