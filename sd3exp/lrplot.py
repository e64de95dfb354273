"""The planned LR-against-step chart (run folder's lr_curve.png), checkpoints marked; drawn by sd3exp.plots."""

from __future__ import annotations

from sd3exp.plan import Plan


def render_plan(plan: Plan) -> bytes:
    """PNG bytes of the plan's LR curve (byte-identical for the same plan)."""
    from sd3exp.plots import lr_curve  # matplotlib only when a chart is drawn

    return lr_curve(plan.lr_curve, plan.checkpoint_steps, f"{plan.experiment}: {plan.schedule['scheduler']}")
