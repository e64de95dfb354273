"""Multirun sweeps: one run folder per job, and the sweep summary written by sd3exp.sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sd3exp.sweep import render_html, write_summary
from tests.helpers import run_cli


def sweep(sweep_dir: Path, *args: str):
    return run_cli("-m", *args, "stage=compile", f"hydra.sweep.dir={sweep_dir}", timeout=120)


def summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_grid_sweep_gives_each_job_its_folder_and_a_summary_row(tmp_path):
    out = sweep(tmp_path, "experiment=fantasy_art_lora", "optimizer.lr=1e-4,2e-4", "lora.rank=16,32")
    assert out.returncode == 0, out.stderr
    data = summary(tmp_path)
    assert data["swept"] == ["optimizer.lr", "lora.rank"]
    assert data["common"] == {"experiment": "fantasy_art_lora", "stage": "compile"}
    values = [(j["values"]["optimizer.lr"], j["values"]["lora.rank"]) for j in data["jobs"]]
    assert values == [("0.0001", "16"), ("0.0001", "32"), ("0.0002", "16"), ("0.0002", "32")]
    for job in data["jobs"]:
        assert job["status"] == "compiled"
        assert job["plan"] == {"steps_per_epoch": 794, "max_train_steps": 24000, "checkpoints": 30}
        env = (tmp_path / job["run_dir"] / "config" / "config.env").read_text()
        assert f"--lora_rank={job['values']['lora.rank']}" in env
    html = (tmp_path / "sweep.html").read_text()
    assert html.count("<tr>") == 5 and "0_fantasy_art_lora/" in html


def test_glob_sweeps_every_shipped_experiment(tmp_path):
    out = sweep(tmp_path, "experiment=glob(fantasy*)")
    assert out.returncode == 0, out.stderr
    jobs = summary(tmp_path)["jobs"]
    assert [j["values"]["experiment"] for j in jobs] == ["fantasy_art", "fantasy_art_lora"]
    assert [j["run_dir"] for j in jobs] == ["0_fantasy_art", "1_fantasy_art_lora"]


def test_hparams_search_config_sweeps_without_dash_m(tmp_path):
    out = run_cli("experiment=fantasy_art_lora", "hparams_search=lr_rank", "stage=compile",
                  f"hydra.sweep.dir={tmp_path}", timeout=120)
    assert out.returncode == 0, out.stderr
    data = summary(tmp_path)
    assert len(data["jobs"]) == 6 and set(data["swept"]) == {"optimizer.lr", "lora.rank"}


def test_a_failing_job_is_recorded_as_failed(tmp_path):
    out = sweep(tmp_path, "experiment=fantasy_art_lora", "lora.rank=16,0")
    assert out.returncode != 0
    jobs = summary(tmp_path)["jobs"]
    assert [j["status"] for j in jobs] == ["compiled", "failed"]
    assert jobs[1]["plan"] is None


def test_summary_links_eval_outputs_and_escapes_html(tmp_path):
    run = tmp_path / "0_x"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "grid.png").write_bytes(b"png")
    (tmp_path / ".sweep").mkdir()
    record = {"num": 0, "overrides": ["eval.prompts=[<b>]"], "run_dir": str(run), "training_dir": None,
              "status": "completed", "error": None}
    (tmp_path / ".sweep" / "0.json").write_text(json.dumps(record))
    data = write_summary(tmp_path)
    job = data["jobs"][0]
    assert job["status"] == "evaluated" and job["links"] == {"grid": "0_x/eval/grid.png", "report": None}
    html = render_html(data)
    assert "&lt;b&gt;" in html and "<b>" not in html and 'href="0_x/eval/grid.png"' in html


@pytest.mark.slow
def test_submitit_local_runs_four_jobs_two_at_a_time(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    out = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=2",
                "experiment=fantasy_art_lora", "optimizer.lr=1e-4,2e-4", "lora.rank=16,32")
    assert out.returncode == 0, out.stderr
    jobs = summary(tmp_path)["jobs"]
    assert len(jobs) == 4 and {j["status"] for j in jobs} == {"compiled"}
    training = {yaml.safe_load((tmp_path / j["run_dir"] / "resolved.yaml").read_text())["paths"]["training_dir"]
                for j in jobs}
    assert training == {str(tmp_path / j["run_dir"] / "training") for j in jobs} and len(training) == 4
    assert (out.stdout + out.stderr).count("Submitit 'local' sweep output dir") == 2  # two batches of two


def test_an_early_stopped_job_shows_its_stop_and_steps_trained(tmp_path):
    from sd3exp.live import LiveState

    out = sweep(tmp_path, "experiment=demo_quick", "optimizer.lr=1e-4,2e-4")
    assert out.returncode == 0, out.stderr
    job = summary(tmp_path)["jobs"][0]
    assert job["trained"] == {"steps": 0, "early_stop": None}
    run = tmp_path / job["run_dir"]
    for step in (2, 4):
        (run / "training" / f"checkpoint-{step}").mkdir(parents=True)
    LiveState(early_stop={"step": 4, "objective": "pixel_fidelity", "reason": "no <improvement>"}).save(run / "live.json")
    data = write_summary(tmp_path)
    stopped = next(j for j in data["jobs"] if j["run_dir"] == job["run_dir"])
    assert stopped["trained"] == {"steps": 4, "early_stop": {"step": 4, "objective": "pixel_fidelity",
                                                             "reason": "no <improvement>"}}
    assert "stopped early at step 4 of 6: no &lt;improvement&gt;" in (tmp_path / "sweep.html").read_text()
