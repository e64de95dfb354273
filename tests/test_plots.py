"""matplotlib charts: deterministic bytes, the planned LR curve and the score plot."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sd3exp import plots
from sd3exp.evaluate.select import Candidate


def test_lr_curve_bytes_are_the_same_for_the_same_curve_and_differ_for_another():
    curve = [(0, 0.0), (10, 1e-4), (100, 1e-4)]
    first = plots.lr_curve(curve, [20, 40], "demo: constant")
    assert first == plots.lr_curve(curve, [20, 40], "demo: constant")
    assert first != plots.lr_curve(curve, [20, 60], "demo: constant")
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size == (800, 360)
    assert "Software" not in image.info


def test_the_score_plot_has_one_panel_per_measure_and_marks_the_chosen_checkpoint():
    candidates = [Candidate("base", None, {"pixel_fidelity": 50.0, "drift": 0.0}, 2, 0, 0),
                  Candidate("checkpoint-2", 2, {"pixel_fidelity": 60.0, "drift": 5.0}, 2, 0, 0),
                  Candidate("checkpoint-4", 4, {"pixel_fidelity": 70.0, "drift": 9.0}, 2, 0, 0)]
    marked = np.asarray(Image.open(io.BytesIO(plots.score_plot(candidates, "checkpoint-4", "pixel_fidelity")))
                        .convert("RGB"))
    unmarked = np.asarray(Image.open(io.BytesIO(plots.score_plot(candidates, None, "pixel_fidelity"))).convert("RGB"))
    assert marked.shape[0] > 400  # two panels
    green = (np.abs(marked.astype(int) - (0x17, 0x6b, 0x2c)).sum(axis=-1) < 30).sum()
    assert green > 50 and (np.abs(unmarked.astype(int) - (0x17, 0x6b, 0x2c)).sum(axis=-1) < 30).sum() == 0


def test_the_training_plot_draws_held_out_losses_when_simpletuner_logged_them():
    records = [{"step": s, "metrics": {"train_loss": 1 / s, "learning_rate": 1e-4}} for s in range(1, 9)]
    plain = plots.training_plot(records, 4)
    held = records + [{"step": s, "metrics": {"loss/val/shapes-eval": 0.5 / s}} for s in (4, 8)]
    assert plots.training_plot(held, 4) != plain
    assert plots.training_plot(held, 4) == plots.training_plot(held, 4)
