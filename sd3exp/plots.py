"""Charts drawn with matplotlib (Agg backend, fixed PNG metadata: same data, same bytes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.figure import Figure  # noqa: E402

from sd3exp.evaluate.cells import column_title  # noqa: E402
from sd3exp.evaluate.select import MEASURES, Candidate  # noqa: E402
from sd3exp.io import read_json, write_bytes  # noqa: E402
from sd3exp.layout import RunLayout  # noqa: E402

LINE, MARK, TICK = "#c82828", "#176b2c", "#d2d2d2"
DPI = 100
# A difference between checkpoint means smaller than this says nothing (rough judgement: CLIP scores
# barely move between good checkpoints, per SimpleTuner's docs; pixel measures on 32 px thumbnails)
NOISE = {"pixel_fidelity": 0.5, "drift": 0.5, "holdout_pixel": 0.5, "clip_t": 0.5, "clip_i": 0.005, "dino_i": 0.005,
         "holdout_clip": 0.005, "holdout_dino": 0.005, "pickscore": 0.1, "aesthetic": 0.05, "hps": 0.2}


def noise(measure: str, values: Sequence[float]) -> float:
    """The measure's noise floor (0.1 % of its size for a measure without one)."""
    return NOISE.get(measure, 1e-3 * max((abs(v) for v in values), default=1.0))


def score_limits(measure: str, values: Sequence[float]) -> Optional[Tuple[float, float]]:
    """Y limits that keep a spread below the measure's noise flat (the mean +- 2 x noise); None (zoom to
    the data) when the spread is larger."""
    if not values:
        return None
    floor = noise(measure, values)
    middle = (max(values) + min(values)) / 2
    return (middle - 2 * floor, middle + 2 * floor) if max(values) - min(values) < floor else None


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes without a timestamp or version in its metadata; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def lr_curve(curve: Sequence[Tuple[int, float]], checkpoints: Sequence[int], title: str) -> bytes:
    """Learning rate against step; checkpoint steps as grey vertical lines."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for step in checkpoints:
        ax.axvline(step, color=TICK, linewidth=1, zorder=0)
    ax.plot([s for s, _ in curve], [v for _, v in curve], color=LINE, linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{title}\nlearning rate as SimpleTuner will apply it", fontsize=10)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return png(fig)


def score_plot(candidates: Sequence[Candidate], best: Optional[str], objective: str, best_variant: str = "") -> bytes:
    """One panel per measure, checkpoints (at each combination of the axes) on the X axis in column
    order, the chosen one marked."""
    measures = [m for m in MEASURES if any(m in c.scores for c in candidates)]
    fig, axes = plt.subplots(max(1, len(measures)), 1, figsize=(8, 1.2 + 2.2 * max(1, len(measures))),
                             sharex=True, squeeze=False)
    titles = [column_title(c.label, c.step) + c.variant.replace("_", " ") for c in candidates]
    xs = list(range(len(candidates)))
    for ax, measure in zip(axes[:, 0], measures):
        points = [(x, c.scores[measure]) for x, c in zip(xs, candidates) if measure in c.scores]
        ax.plot([x for x, _ in points], [y for _, y in points], color=LINE, marker="o", linewidth=2)
        ax.set_ylabel(measure + (" (objective)" if measure == objective else ""), fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
        values = [y for _, y in points]
        limits = score_limits(measure, values)
        if limits:
            ax.set_ylim(*limits)
            ax.text(0.01, 0.95, f"spread {max(values) - min(values):.2g} < noise {noise(measure, values):g}: "
                    "no real difference", transform=ax.transAxes, va="top", fontsize=8, color="#555555")
        if best is not None:
            ax.axvline([(c.label, c.variant) for c in candidates].index((best, best_variant)), color=MARK,
                       linestyle="--", linewidth=1.5)
    if not measures:
        axes[0, 0].text(0.5, 0.5, "no scores", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xticks(xs, titles, rotation=30, ha="right", fontsize=8)
    axes[0, 0].set_title("mean score per checkpoint" + (" (dashed: chosen)" if best else ""), fontsize=10)
    fig.tight_layout()
    return png(fig)


def training_plot(records: Sequence[Mapping], best_step: Optional[int]) -> bytes:
    """Training loss and learning rate against step from SimpleTuner's own metrics records
    ({"step": N, "metrics": {"train_loss": .., "learning_rate": .., "loss/val/<dataset>": ..}}: the
    held-out loss of an eval dataset, when there is one), the chosen step marked."""
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    held_out = sorted({k for r in records for k in r["metrics"] if k.startswith("loss/val/")})
    for ax, key in [(loss_ax, "train_loss"), (lr_ax, "learning_rate")] + [(loss_ax, k) for k in held_out]:
        points = [(r["step"], r["metrics"][key]) for r in records if key in r["metrics"]]
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.5, label=key,
                color=LINE if key in ("train_loss", "learning_rate") else None, marker="o" if key in held_out else None)
        ax.set_ylabel("loss" if ax is loss_ax else key, fontsize=9)
    if held_out:
        loss_ax.legend(fontsize=8)
        if best_step is not None:
            ax.axvline(best_step, color=MARK, linestyle="--", linewidth=1.5)
    lr_ax.set_xlabel("step")
    loss_ax.set_title("SimpleTuner's training metrics" + (" (dashed: chosen checkpoint)" if best_step else ""),
                      fontsize=10)
    fig.tight_layout()
    return png(fig)


def render_plan(plan: dict) -> bytes:
    """PNG bytes of a plan.json's LR curve (byte-identical for the same plan)."""
    return lr_curve(plan["lr_curve"], plan["checkpoint_steps"], f"{plan['experiment']}: {plan['schedule']['scheduler']}")


def draw_lr_curve(run_dir: Path) -> Optional[Path]:
    """Draw `<run>/lr_curve.png` (the planned LR against step, checkpoints marked) from `<run>/plan.json`
    when it is missing or older than plan.json; its path (None without plan.json). Drawn where it is
    shown, the report, and only when plan.json changed: a compile loads no plotting library."""
    layout = RunLayout(run_dir)
    if not layout.plan.is_file():
        return None
    if layout.lr_curve_outdated():
        write_bytes(layout.lr_curve, render_plan(read_json(layout.plan)))
    return layout.lr_curve
