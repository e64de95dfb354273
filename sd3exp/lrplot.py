"""A small LR-against-step chart (Pillow only), with checkpoints marked."""

from __future__ import annotations

import io
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw

from sd3exp.plan import Plan

W, H, PAD = 800, 360, 56


def _xy(step: float, lr: float, max_step: int, max_lr: float) -> Tuple[float, float]:
    x = PAD + (W - 2 * PAD) * step / max(1, max_step)
    y = H - PAD - (H - 2 * PAD) * lr / max(max_lr, 1e-30)
    return x, y


def _axes(draw: ImageDraw.ImageDraw, max_step: int, max_lr: float) -> None:
    draw.line([(PAD, PAD), (PAD, H - PAD), (W - PAD, H - PAD)], fill="black")
    for frac in (0, 0.5, 1):
        _, y = _xy(0, max_lr * frac, max_step, max_lr)
        draw.text((4, y - 6), f"{max_lr * frac:.2g}", fill="black")
        x, _ = _xy(max_step * frac, 0, max_step, max_lr)
        draw.text((x - 10, H - PAD + 6), str(int(max_step * frac)), fill="black")
    draw.text((W // 2 - 20, H - 22), "step", fill="black")
    draw.text((4, 8), "learning rate (as SimpleTuner will apply it)", fill="black")


def render(curve: Sequence[Tuple[int, float]], checkpoints: List[int], title: str) -> bytes:
    """PNG bytes of the curve; checkpoint steps are drawn as grey ticks."""
    max_step = max(s for s, _ in curve)
    max_lr = max(v for _, v in curve) or 1.0
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    for step in checkpoints:
        x, _ = _xy(step, 0, max_step, max_lr)
        draw.line([(x, PAD), (x, H - PAD)], fill=(210, 210, 210))
    _axes(draw, max_step, max_lr)
    draw.line([_xy(s, v, max_step, max_lr) for s, v in curve], fill=(200, 40, 40), width=2)
    draw.text((W - PAD - 6 * len(title), 8), title, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_plan(plan: Plan) -> bytes:
    return render(plan.lr_curve, plan.checkpoint_steps, f"{plan.experiment}: {plan.schedule['scheduler']}")
