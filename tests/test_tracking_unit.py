"""What the trackers are given (sd3exp/tracking/record.py) and MLflow's key rule, without a trainer."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sd3exp.project import ROOT
from sd3exp.tracking import logdir
from sd3exp.tracking.record import flatten, score_metrics, training_metrics


def cell(label, step, prompt, seed, scores, status="ok"):
    return {"label": label, "step": step, "prompt_index": prompt, "seed": seed, "status": status, "scores": scores,
            "paths": []}


def test_scores_are_means_per_checkpoint_and_the_final_model_is_kept_apart_from_the_last_checkpoint():
    cells = [cell("base", None, 0, 0, {"pixel_fidelity": 10.0}),
             cell("checkpoint-2", 2, 0, 0, {"pixel_fidelity": 40.0}), cell("checkpoint-2", 2, 1, 0, {"pixel_fidelity": 50.0}),
             cell("checkpoint-4", 4, 0, 0, {"pixel_fidelity": 70.0}),
             cell("checkpoint-4", 4, 1, 0, {"pixel_fidelity": 1.0}, status="error"),
             cell("checkpoint-4", 4, 1, 0, {"pixel_fidelity": float("nan")}),
             cell("final", None, 0, 0, {"pixel_fidelity": 90.0})]
    metrics = score_metrics(cells, final_step=4)
    assert ("score/pixel_fidelity", 10.0, 0) in metrics  # the base model at step 0
    assert ("score/pixel_fidelity", 45.0, 2) in metrics and ("score/pixel_fidelity", 70.0, 4) in metrics
    assert ("final/pixel_fidelity", 90.0, 4) in metrics and ("final/pixel_fidelity/p0_s0", 90.0, 4) in metrics
    assert ("score/pixel_fidelity/p1_s0", 50.0, 2) in metrics
    assert len(metrics) == len(set(metrics)) == 4 + 5  # 4 means, 5 cells: the failed and the NaN cell left out


def test_training_metrics_keep_numbers_only():
    records = [{"step": 1, "metrics": {"train_loss": 0.5, "learning_rate": 1e-4, "note": "x", "flag": True}},
               {"step": 2, "metrics": {"train_loss": float("inf"), "validation_loss": 0.25}}]
    assert training_metrics(records) == [("train/train_loss", 0.5, 1), ("train/learning_rate", 1e-4, 1),
                                         ("train/validation_loss", 0.25, 2)]


def test_flatten_writes_nested_keys_and_json_values():
    data = {"a": {"b": 1, "c": [1, "x"], "d": {}}, "e": "text", "f": None}
    assert dict(flatten(data)) == {"a.b": "1", "a.c": '[1, "x"]', "a.d": "{}", "e": "text", "f": "null"}


@settings(deadline=None)
@given(st.text(min_size=1, max_size=40))
@example("0/")  # found by hypothesis in this suite: MLflow refuses a name that reads as another path
def test_a_param_key_is_one_mlflow_accepts_and_as_long(key):
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import _validate_param_name

    from sd3exp.tracking.mlflow_store import param_key

    safe = param_key(key)
    assert len(safe) == len(key) and re.fullmatch(r"[\w\-. ]+", safe)
    _validate_param_name(safe)


def test_tensorboards_logdir_is_the_output_folder_or_the_runs_parent(tmp_path):
    assert logdir(tmp_path / "outputs" / "demo" / "x", str(tmp_path / "outputs")) == (tmp_path / "outputs").resolve()
    assert logdir(tmp_path / "elsewhere" / "run", str(tmp_path / "outputs")) == (tmp_path / "elsewhere").resolve()


def test_plan_and_compile_do_not_import_a_tracker(tmp_path):
    """stage=plan and stage=compile, run in one process: neither MLflow nor TensorBoard is loaded."""
    code = ("import sys\nfrom sd3exp.cli import main\n"
            f"for stage in ('plan', 'compile'):\n    sys.argv = ['sd3exp', 'experiment=demo_quick', 'stage=' + stage, "
            f"'hydra.run.dir={tmp_path / 'run'}', 'paths.output_root={tmp_path}']\n"
            "    try:\n        main()\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard', 'tensorboardX')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "compiled demo_quick" in out.stdout and out.stdout.rstrip().splitlines()[-1] == "LOADED []"


def test_a_multirun_that_evaluates_nothing_makes_no_mlflow_parent_run(tmp_path):
    """A 2-job stage=compile sweep has nothing to log: no MLflow store, no parent run (it cost seconds a job)."""
    out = subprocess.run([sys.executable, "-m", "sd3exp", "-m", "experiment=demo_quick", "optimizer.lr=1e-4,2e-4",
                          "stage=compile", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.output_root={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "sweep" / "sweep.json").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep" / "mlflow.json").exists()
