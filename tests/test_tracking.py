"""MLflow and TensorBoard (sd3exp/tracking/): one real demo_quick run (trained once for the module)
logged to a real `mlflow server` on 127.0.0.1, to the local default store and to TensorBoard event
files, read back with MlflowClient and tensorboard's own reader; the MLflow UI in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean
from typing import Dict, List, Optional

import pytest
import requests
from PIL import Image

from tests import browser
from tests.helpers import needs_trainer, run_cli

mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed (make venv)")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = [needs_trainer, pytest.mark.slow]

RUN_NAME = "tracked-demo-run"
TRAINED = ("experiment=demo_quick", "trainer.report_to=simpletuner")  # what the fixture trained
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` (or `mlflow ui`) on 127.0.0.1 with a SQLite store in `folder`."""

    def __init__(self, folder: Path, command: str = "server", store: Optional[str] = None) -> None:
        self.folder, self.command, self.port = folder, command, free_port()
        self.store = store or f"sqlite:///{folder / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        extra = ["--artifacts-destination", str(self.folder / "artifacts")] if self.command == "server" else []
        self.proc = subprocess.Popen([str(BIN / "mlflow"), self.command, "--backend-store-uri", self.store, *extra,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                     stdout=open(self.folder / f"{self.command}.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / f"{self.command}.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=10).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow {self.command} did not start: {(self.folder / f'{self.command}.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:  # uvicorn waiting on its worker
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, server):
    """demo_quick trained and evaluated once, logged to the server and to TensorBoard."""
    base = tmp_path_factory.mktemp("tracking")
    run, outputs = base / RUN_NAME, base / "outputs"
    out = run_cli(*TRAINED, f"hydra.run.dir={run}", f"paths.output_root={outputs}",
                  f"tracking.mlflow.uri={server.url}", "tracking.tensorboard.enabled=true", timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run, outputs, out


def evaluate(run: Path, outputs: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_cli(*TRAINED, "stage=eval", f"hydra.run.dir={run}", f"paths.output_root={outputs}", *extra,
                   timeout=timeout)


def run_id(run: Path, uri: str) -> str:
    return json.loads((run / "mlflow.json").read_text())[uri]["run_id"]


def expected_scores(run: Path) -> Dict[str, Dict[int, float]]:
    """measure -> step -> mean over the checkpoint's cells, from cells.json (the final model at the last step)."""
    cells = json.loads((run / "eval" / "cells.json").read_text())
    final = json.loads((run / "plan.json").read_text())["max_train_steps"]
    values: Dict[str, Dict[int, List[float]]] = {}
    for c in cells:
        if c["status"] == "ok":
            for measure, value in c["scores"].items():
                values.setdefault(measure, {}).setdefault(c["step"] if c["step"] is not None else final, []).append(value)
    return {m: {s: fmean(v) for s, v in by_step.items()} for m, by_step in values.items()}


def test_the_run_its_params_scores_grid_and_best_tag_are_in_the_mlflow_server(trained, server, tmp_path):
    run, _, out = trained
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("demo_quick")
    found = client.search_runs([experiment.experiment_id], f"tags.`sd3exp.run_dir` = '{run.resolve()}'")
    assert [r.info.run_id for r in found] == [run_id(run, server.url)]
    logged = found[0]
    assert f"mlflow: run {logged.info.run_id} in {server.url}" in out.stdout
    params, tags = logged.data.params, logged.data.tags
    assert (params["optimizer.lr"], params["lora.rank"], params["model.type"]) == ("0.0001", "4", "lora")
    assert "trainer.report_to=simpletuner" in params["overrides"]
    record = json.loads((run / "run.json").read_text())
    assert tags["sd3exp.config_hash"] == record["config_hash"] and tags["sd3exp.experiment"] == "demo_quick"
    assert tags["sd3exp.run_dir"] == str(run.resolve()) and logged.info.run_name == RUN_NAME
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert tags["sd3exp.git_commit"] == commit.stdout.strip()
    best = json.loads((run / "eval" / "best.json").read_text())
    assert best["best"] and tags["sd3exp.best_checkpoint"] == best["best"]["label"]
    scores = expected_scores(run)
    assert {"pixel_fidelity"} <= set(scores)
    planned = json.loads((run / "plan.json").read_text())
    for measure, by_step in scores.items():
        history = client.get_metric_history(logged.info.run_id, f"score/{measure}")
        assert sorted(m.step for m in history) == sorted(by_step) == planned["checkpoint_steps"], measure
        assert {m.step: pytest.approx(m.value) for m in history} == by_step
    training = [json.loads(line) for line in (run / "training" / "training_metrics.jsonl").read_text().splitlines()
                if line.strip()]
    loss_steps = sorted(r["step"] for r in training if isinstance(r["metrics"].get("train_loss"), (int, float)))
    assert loss_steps and sorted(m.step for m in client.get_metric_history(logged.info.run_id, "train/train_loss")) == loss_steps
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "eval")}
    assert {"eval/grid.png", "eval/report.html", "eval/best.json", "eval/cells.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "config")} >= {"config/config.env"}
    assert "plan.json" in {a.path for a in client.list_artifacts(logged.info.run_id)}
    grid = client.download_artifacts(logged.info.run_id, "eval/grid.png", str(tmp_path))
    assert Path(grid).read_bytes() == (run / "eval" / "grid.png").read_bytes()


def test_tensorboard_event_files_hold_the_scalars_and_images_by_step(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, out = trained
    assert f"tensorboard: {run / 'tensorboard'}" in out.stdout
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = json.loads((run / "plan.json").read_text())["checkpoint_steps"]
    for measure, by_step in expected_scores(run).items():
        read = {e.step: e.value for e in events.Scalars(f"score/{measure}")}
        assert read == {s: pytest.approx(v, rel=1e-6) for s, v in by_step.items()}, measure
    assert [e.step for e in events.Images("render/prompt0")] == steps
    sheet = events.Images("grid/grid")
    assert [e.step for e in sheet] == [steps[-1]]
    grid = Image.open(run / "eval" / "grid.png")
    assert (sheet[0].width, sheet[0].height) == grid.size  # the demo's grid is below the 2048 px cap


def test_re_evaluation_updates_the_same_mlflow_run(trained, server):
    run, outputs, _ = trained
    before = run_id(run, server.url)
    out = evaluate(run, outputs, f"tracking.mlflow.uri={server.url}", "eval.select.direction=min")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("demo_quick")
    found = client.search_runs([experiment.experiment_id], f"tags.`sd3exp.run_dir` = '{run.resolve()}'")
    assert [r.info.run_id for r in found] == [before] == [run_id(run, server.url)]
    tags = found[0].data.tags
    best = json.loads((run / "eval" / "best.json").read_text())
    assert tags["sd3exp.best_checkpoint"] == best["best"]["label"] and tags["sd3exp.now.eval.select.direction"] == "min"
    history = client.get_metric_history(before, "score/pixel_fidelity")
    assert len(history) == len({m.step for m in history})  # nothing logged twice


def test_a_two_job_multirun_is_a_parent_run_with_two_children(trained, server, tmp_path):
    run, outputs, _ = trained
    out = run_cli("-m", "experiment=demo_quick", "stage=eval", f"paths.training_dir={run / 'training'}",
                  f"paths.output_root={outputs}", f"tracking.mlflow.uri={server.url}", "eval.max_step=2",
                  "eval.include_final=false", "eval.seeds=[0],[1]", f"hydra.sweep.dir={tmp_path}", timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parent = json.loads((tmp_path / "mlflow.json").read_text())[server.url]
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("demo_quick")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted(c.data.tags["sd3exp.run_dir"] for c in children) == sorted(
        str((tmp_path / j["run_dir"]).resolve()) for j in sweep["jobs"])
    assert len(children) == 2
    objective = {m.step: m.value for m in client.get_metric_history(parent, "objective")}
    assert objective == {j["num"]: pytest.approx(j["best"]["score"]) for j in sweep["jobs"]}
    tags = client.get_run(parent).data.tags
    assert tags["sd3exp.best_job"] == str(sweep["ranking"][0]) and tags["sd3exp.swept"] == "eval.seeds"


def test_the_local_default_store_and_the_mlflow_ui_show_the_run(trained, tmp_path):
    run, outputs, _ = trained
    out = evaluate(run, outputs)  # tracking.mlflow.uri left at its default
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uri = f"sqlite:///{outputs.resolve() / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out.stdout
    client = MlflowClient(uri)
    logged = client.get_run(run_id(run, uri))
    best = json.loads((run / "eval" / "best.json").read_text())
    assert logged.data.tags["sd3exp.best_checkpoint"] == best["best"]["label"]
    assert "eval/grid.png" in {a.path for a in client.list_artifacts(logged.info.run_id, "eval")}
    assert (outputs / "mlartifacts").is_dir()  # artifacts beside the store, not in the working folder
    if not browser.chromium() and os.environ.get("CI") != "true":
        pytest.skip("chromium is not installed (make browser)")
    ui = MlflowServer(tmp_path / "ui", command="ui", store=uri).start()
    try:
        page_url = f"{ui.url}/#/experiments/{logged.info.experiment_id}/runs/{logged.info.run_id}"
        text, shot = open_url(page_url, until=RUN_NAME)
    finally:
        ui.stop()
    keep = Path(os.environ.get("SD3EXP_SCREENSHOTS", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "mlflow-ui-run.png").write_bytes(shot)
    assert RUN_NAME in text and "pixel_fidelity" in text, text[:2000]
    assert Image.open(keep / "mlflow-ui-run.png").size[0] >= 1200


def open_url(url: str, until: str, timeout: float = 120) -> tuple:
    """The page's text once it shows `until` (a single-page app renders after the load event) and a
    PNG screenshot, through Chromium's DevTools protocol."""
    with browser.chromium_page("--window-size=1600,1000") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=url)
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = page.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                             returnByValue=True)["result"].get("value") or ""
            if until in text and "pixel_fidelity" in text:
                break
            time.sleep(1)
        time.sleep(2)  # charts and images settle
        return text, base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])


def test_a_tracking_server_that_is_down_fails_nothing_and_the_next_run_catches_up(trained, server):
    run, outputs, _ = trained
    server.stop()
    try:
        down = run_cli(*TRAINED, f"hydra.run.dir={run}", f"paths.output_root={outputs}",
                       f"tracking.mlflow.uri={server.url}", "eval.select.not_memorised=true", timeout=900)
    finally:
        server.start()
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert "training already complete" in down.stdout
    assert f"MLflow at {server.url} failed" in down.stdout + down.stderr
    assert f"mlflow: NOT logged ({server.url} failed" in down.stdout
    assert down.stdout.rstrip().splitlines()[-1].startswith("best checkpoint: ")  # the summary still ends the run
    client = MlflowClient(server.url)
    assert "sd3exp.now.eval.select.not_memorised" not in client.get_run(run_id(run, server.url)).data.tags
    again = evaluate(run, outputs, f"tracking.mlflow.uri={server.url}", "eval.select.not_memorised=true")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already evaluated" in again.stdout
    assert client.get_run(run_id(run, server.url)).data.tags["sd3exp.now.eval.select.not_memorised"] == "true"
