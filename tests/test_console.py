"""What the user sees (sd3exp/console.py): messages on the "sd3exp" logger, and progress bars that
stay readable when the output is a log file or a pipe."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from sd3exp import bars, console
from tests.comfy_standin import StandIn
from tests.helpers import ROOT
from tests.test_eval_cli import fake_lora_run

LONGEST = 400  # characters a line of a piped run may have


def test_a_piped_run_has_no_long_lines(tmp_path):
    """A ComfyUI sweep of 28 cells (the base model and 6 checkpoints, 2 prompts, 2 seeds) through the CLI with stdout and stderr piped (not a terminal):
    the progress shows as separate short lines, not carriage-return updates on one line."""
    run, models = tmp_path / "run", tmp_path / "comfy-models"
    fake_lora_run(run, steps=(1, 2, 3, 4, 5, 6))
    prompts = ["k4s4, red circle", "k4s4, blue square"]
    with StandIn(tmp_path / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"]) as server:
        out = subprocess.run(  # bytes: text mode would turn every carriage return into a line break
            [sys.executable, "-m", "sd3exp", "experiment=demo_lora", "stage=eval", "demo=false",
             "concepts.0.num_images=16", f"hydra.run.dir={run}", "eval.backend=comfyui", f"eval.url={server.url}",
             f"eval.models_dir={models}", "eval.include_final=false", f"eval.prompts={json.dumps(prompts)}",
             "eval.seeds=[0,1]"], cwd=ROOT, capture_output=True, env=dict(os.environ), timeout=600)
    text = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, text[-2000:]
    lines = text.split("\n")
    assert max(map(len, lines)) <= LONGEST, max(lines, key=len)[:1000]
    assert any("comfyui" in line and "28/28" in line for line in lines), text[-2000:]


class Clock:
    """A stand-in for tqdm's clock: each reading is `step` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_bar_on_a_file_prints_a_plain_line_every_interval_and_the_last_state(monkeypatch):
    """1000 updates 0.1 s apart (100 s) with a 10 s interval: about ten plain lines, the last one 1000/1000."""
    out = io.StringIO()
    monkeypatch.setattr("tqdm.std.time", Clock(0.1))  # the clock each bar reads
    bar = console.progress(total=1000, desc="work", unit="item", file=out, mininterval=10)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix_str(f"item {i} " + "x" * 300)  # refreshes on a terminal; not here
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 5 <= len(lines) <= 13, lines
    assert all(len(line) <= bars.PLAIN_COLUMNS for line in lines)
    assert lines[-1].startswith("work: 100%") and "1000/1000" in lines[-1]


def test_tqdms_own_mininterval_variable_sets_how_often_a_bar_on_a_file_prints(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("tqdm.std.time", Clock(0.1))
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    bar = console.progress(total=50, desc="work", file=out)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) >= 50


def test_a_bar_on_a_terminal_is_tqdm_as_it_is():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = console.progress(total=3, file=Terminal())
    assert type(bar) is bars.tqdm
    bar.close()


def test_a_bar_does_not_import_multiprocessing():
    """tqdm's default lock would (4 ms at every evaluation's first bar); sd3exp's bars need a thread lock only."""
    code = ("import io, sys; from sd3exp import console; bar = console.progress(total=2, file=io.StringIO()); "
            "bar.update(2); bar.close(); print('multiprocessing' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


@pytest.fixture
def logged(caplog):
    """caplog for the "sd3exp" logger (it does not propagate to the root logger caplog listens on)."""
    logger = logging.getLogger("sd3exp")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_info_and_warn_print_plain_lines_on_stdout_and_reach_caplog(capsys, logged):
    console.info("report: somewhere/report.html")
    console.warn("the disk is nearly full")
    assert capsys.readouterr().out == "report: somewhere/report.html\nwarning: the disk is nearly full\n"
    assert [(r.levelname, r.getMessage()) for r in logged.records] == [
        ("INFO", "report: somewhere/report.html"), ("WARNING", "warning: the disk is nearly full")]
