"""Sweeps with an objective: jobs ranked by their best checkpoint's score, `sd3exp best`, Optuna."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sd3exp.evaluate.score import objective
from sd3exp.io import write_json
from tests.helpers import needs_trainer, run_cli


def scored_eval(run_dir: Path, score: float, label: str = "checkpoint-2") -> None:
    """eval/best.json and cells.json as an evaluation leaves them (one chosen checkpoint, one image)."""
    eval_dir = run_dir / "eval"
    (eval_dir / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (int(score), 0, 0)).save(eval_dir / "images" / f"{label}_p0_s0.png")
    write_json(eval_dir / "cells.json", [{"label": label, "step": 2, "status": "ok",
                                          "paths": [f"images/{label}_p0_s0.png"]}])
    chosen = {"label": label, "step": 2, "scores": {"pixel_fidelity": score}, "checkpoint": f"/ck/{label}"}
    write_json(eval_dir / "best.json", {"best": chosen, "runners_up": [], "excluded": [], "failed_cells": 0,
                                        "rule": {"objective": "pixel_fidelity", "direction": "max",
                                                 "text": "highest mean pixel_fidelity"}})


def test_best_ranks_the_jobs_of_a_sweep_by_their_objective(tmp_path):
    out = run_cli("-m", "experiment=fantasy_art_lora", "lora.rank=4,8,16,32", "stage=compile",
                  f"hydra.sweep.dir={tmp_path}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    for run, score in zip(runs, (61.0, 80.5, 70.0, 80.5)):  # a tie between jobs 1 and 3: the lower number wins
        scored_eval(run, score)
    best = run_cli("best", str(tmp_path))
    assert best.returncode == 0, best.stderr
    assert "winner: job 1" in best.stdout and "pixel_fidelity 80.5" in best.stdout
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["ranking"] == [1, 3, 2, 0]
    assert [(j["num"], j["rank"]) for j in data["jobs"]] == [(1, 1), (3, 2), (2, 3), (0, 4)]
    html = (tmp_path / "sweep.html").read_text()
    assert "Winner: job 1" in html and html.index("1_fantasy_art_lora/") < html.index("0_fantasy_art_lora/")
    assert 'alt="best render of job 1"' in html
    assert objective(runs[1]) == 80.5


def test_best_of_a_run_folder_and_of_something_else(tmp_path):
    scored_eval(tmp_path / "run", 42.0)
    out = run_cli("best", str(tmp_path / "run"))
    assert out.returncode == 0 and "step 2 (checkpoint-2): pixel_fidelity 42; /ck/checkpoint-2" in out.stdout
    other = run_cli("best", str(tmp_path))
    assert other.returncode == 2 and "neither a scored run folder" in other.stderr


def test_a_rule_that_chooses_nothing_is_a_nan_objective(tmp_path):
    scored_eval(tmp_path, 1.0)
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    write_json(tmp_path / "eval" / "best.json", {**best, "best": None})
    assert math.isnan(objective(tmp_path)) and objective(tmp_path / "nowhere") is None


FAST = ["experiment=demo", "training.epochs=0", "training.max_steps=2", "checkpointing.every_steps=1", "eval.steps=1",
        "eval.width=32", "eval.height=32", "eval.prompts=[\"k4s4, red circle\"]"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 2 x (train 2 steps + evaluate): about 2 min on 2 idle cores
@needs_trainer
def test_a_two_trial_optuna_sweep_is_ranked_by_the_objective_and_writes_its_results(tmp_path):
    """The smallest sweep that ranks, through sd3exp's Optuna sweeper (hparams_search=optuna_lr_rank):
    sweep.json ranks both trials by their best score, optimization_results.yaml names the best, and the
    study in <sweep dir>/optuna.db has both trials complete."""
    import optuna

    out = run_cli(*FAST, "hparams_search=optuna_lr_rank", "hydra.sweeper.n_trials=2", "stage=all",
                  f"hydra.sweep.dir={tmp_path}", timeout=3000)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "sweep.json").read_text())
    scores = {j["num"]: j["best"]["score"] for j in data["jobs"]}
    assert len(scores) == 2 and all(s is not None for s in scores.values())
    assert data["ranking"] == sorted(scores, key=lambda n: (-scores[n], n))
    assert (tmp_path / "sweep.html").read_text().count('alt="best render of job') == 2
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.lr", "lora.rank"}
    assert results["best_value"] == pytest.approx(max(scores.values()))
    study = optuna.load_study(study_name="sd3exp_lr_rank", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(j["trial"]["state"] for j in data["jobs"]) == ["complete", "complete"]
    assert data["optuna"]["study"] == "sd3exp_lr_rank" and data["steps_saved"]["steps"] == 0
