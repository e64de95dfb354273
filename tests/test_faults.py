"""Fault injection: SIGKILL and SIGTERM to sd3exp and to the trainer at several points of a demo run
(after the audit, training, inside a checkpoint save, after the final save, the evaluation), each
followed by the re-run a user would type.

After the last re-run the run has the checkpoint steps of an uninterrupted run (plan.json; the e2e
test checks those against a real uninterrupted run), every checkpoint finished before a kill is
byte-identical, no lock or trainer process is left, and the user's dataset is byte-identical; the
evaluation has every cell, those rendered before a kill byte-identical. (A kill inside prepare itself,
which takes milliseconds on the demo's images, is in test_user_safety, on a larger materialized set.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import yaml

from sd3exp.demo import DEMO_COUNTS
from sd3exp.demo_data import make_demo_dataset
from sd3exp.project import ROOT
from sd3exp.runfolder import checkpoint_dirs, exclusive, training_elsewhere
from sd3exp.train import run_processes
from tests.comfy_standin import StandIn
from tests.helpers import needs_trainer, run_cli
from tests.test_user_safety import small_disk

pytestmark = [needs_trainer, pytest.mark.slow]

EPOCHS = 16  # 96 steps (6 a epoch), a checkpoint every 2: SimpleTuner takes seconds to stop, and trains on meanwhile
STEPS = 96
WAIT_S = 900


def digest(folder: Path) -> Dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trainer_pid(pid: int) -> Optional[int]:
    """The SimpleTuner process sd3exp started (not its preflight check); it leads its own process group."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"simpletuner") for a in argv) and b"train" in argv:
                return int(child)
    except OSError:
        return None
    return None


@dataclass
class Kill:
    """Send `sig` to sd3exp or to the trainer's process group once `ready(run)` holds."""

    name: str
    target: str  # "sd3exp" or "trainer"
    sig: signal.Signals
    ready: Callable[[Path, int], bool]  # (run folder, latest checkpoint when this run started)
    exit_code: Optional[int]  # what sd3exp must exit with (None: it is the one killed)
    message: Optional[str] = None  # what it must say
    in_training: bool = True  # wait for the trainer to run before looking at `ready`
    poll_s: float = 0.05
    next_stage: Optional[str] = None  # the stage the printed command continues with (None: the same command)


@dataclass
class Chain:
    run: Path
    dataset: Path
    dataset_before: Dict[str, str]
    command: List[str]
    plan: dict
    kept: Dict[str, Dict[str, str]] = field(default_factory=dict)  # checkpoint -> digest, before a kill
    hit: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)


def saving(run: Path) -> bool:
    """A checkpoint save is under way: a `-tmp` folder, or a checkpoint without its guard file."""
    training = run / "training"
    if not training.is_dir():
        return False
    return any(re.fullmatch(r"checkpoint-\d+-tmp", p.name) or
               (re.fullmatch(r"checkpoint-\d+", p.name) and not (p / ".guard").exists() and any(p.iterdir()))
               for p in training.iterdir() if p.is_dir())


def _signal_trainer(run: Path, sig: int) -> None:
    for pid in run_processes(run):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def frozen_in_save(run: Path, start: int) -> bool:
    """True with every trainer process stopped (SIGSTOP) while a `-tmp` checkpoint folder is there:
    the kill that follows lands inside a save, verified. SimpleTuner 4.10.1 saves into
    checkpoint-N-tmp (checkpointing_use_tempdir) and renames it when its guard file is written; a
    save seen too late (renamed meanwhile) lets the trainer go on to the next one."""
    if not saving(run):
        return False
    _signal_trainer(run, signal.SIGSTOP)
    if saving(run):
        return True
    _signal_trainer(run, signal.SIGCONT)
    return False


FINAL_SAVE = b"Model weights saved in training/pytorch_lora_weights.safetensors"  # SimpleTuner, after the save


def frozen_after_final_save(run: Path, start: int) -> bool:
    """True with every trainer process stopped (SIGSTOP) once SimpleTuner has said it saved the final
    weights: the SIGTERM to sd3exp that follows lands after training finished, the trainer still there
    (it ends accelerate and exits within a second or so otherwise)."""
    log = run / "train.log"
    if not log.is_file():
        return False
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - (1 << 16)))
        if FINAL_SAVE not in f.read():
            return False
    _signal_trainer(run, signal.SIGSTOP)
    return True


def landed(run: Path) -> str:
    """Where a kill before training landed, from what it left in the prepared folder."""
    dataset = run / "dataset"
    if list(dataset.glob(".*.tmp")) + list(dataset.glob(".*.building")) + list(dataset.glob(".*.old")):
        return "inside prepare"
    return "after prepare: the trainer's preflight" if (dataset / "shapes").is_dir() else "before prepare"


def latest(run: Path) -> int:
    return max(checkpoint_dirs(run / "training"), default=0)


def new_checkpoint(run: Path, start: int) -> bool:
    return latest(run) > start


def kill_points() -> List[Kill]:
    return [
        Kill("SIGKILL sd3exp after the audit", "sd3exp", signal.SIGKILL,
             lambda run, start: (run / "audit.json").is_file(), None, in_training=False),
        Kill("SIGTERM sd3exp during training", "sd3exp", signal.SIGTERM, new_checkpoint, 143,
             "training stopped by SIGTERM"),
        Kill("SIGKILL the trainer inside a checkpoint save", "trainer", signal.SIGKILL, frozen_in_save, 137,
             "SimpleTuner was killed by SIGKILL", poll_s=0.002),
        Kill("SIGKILL sd3exp during training", "sd3exp", signal.SIGKILL, new_checkpoint, None),
        Kill("SIGTERM the trainer during training", "trainer", signal.SIGTERM, new_checkpoint, 143,
             "SimpleTuner was killed by SIGTERM"),
        Kill("SIGTERM sd3exp after the trainer saved the final weights", "sd3exp", signal.SIGTERM,
             frozen_after_final_save, 143, "training had finished (all 96 steps", poll_s=0.01, next_stage="eval"),
    ]


def own_traceback(text: str) -> bool:
    """Whether sd3exp printed a Python traceback. The trainer's last lines it quotes are indented: a
    trainer killed by SIGTERM can end its log with accelerate's copy_stderr thread's traceback (CI)."""
    return re.search(r"^Traceback \(most recent call last\)", text, re.MULTILINE) is not None


def run_and_kill(chain: Chain, kill: Kill, tmp: Path) -> None:
    log = tmp / f"out-{len(chain.outputs)}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", *chain.command], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline, pgid, start = time.monotonic() + WAIT_S, None, latest(chain.run)
    while proc.poll() is None and time.monotonic() < deadline:
        pgid = pgid or trainer_pid(proc.pid)
        if (pgid or not kill.in_training) and kill.ready(chain.run, start):
            break
        time.sleep(kill.poll_s)
    assert proc.poll() is None, f"the run ended before '{kill.name}':\n{log.read_text()[-2000:]}"
    pgid = pgid or trainer_pid(proc.pid)
    chain.kept.update({p.name: digest(p) for p in checkpoint_dirs(chain.run / "training").values()
                       if (p / ".guard").exists()})
    if kill.target == "sd3exp":
        proc.send_signal(kill.sig)
        if kill.ready is frozen_after_final_save:  # sd3exp has the signal; the trainer goes on to its end
            time.sleep(1)
            _signal_trainer(chain.run, signal.SIGCONT)
    else:
        assert pgid, f"no trainer process to kill for '{kill.name}'"
        os.killpg(pgid, kill.sig)
        if kill.ready is frozen_in_save:  # the training process too (a session of its own), still in its save
            assert saving(chain.run), "the save kill did not land inside a save"
            _signal_trainer(chain.run, kill.sig)
            _signal_trainer(chain.run, signal.SIGCONT)
    code = proc.wait(timeout=300)
    text = log.read_text()
    chain.outputs.append(text)
    chain.hit.append(kill.name + (f" (last finished checkpoint: {latest(chain.run)})" if kill.in_training
                                  else f" ({landed(chain.run)})"))
    if kill.exit_code is not None:
        assert code == kill.exit_code, text[-3000:]
        assert kill.message in text and not own_traceback(text), text[-3000:]
        hint = shlex.split(re.search(r"(?:Resume from [^:]+|Continue with): (.+)", text).group(1))
        then = [f"stage={kill.next_stage}" if a == "stage=train" and kill.next_stage else a for a in chain.command]
        assert hint[:3] == ["python", "-m", "sd3exp"] and sorted(hint[3:]) == sorted(then), hint
    else:
        assert code == -kill.sig
    end = time.monotonic() + 180  # an orphaned trainer stops on its own: its output pipe is gone
    while run_processes(chain.run) and time.monotonic() < end:
        time.sleep(0.5)
    assert not run_processes(chain.run), f"trainer processes outlived '{kill.name}'"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    tmp = tmp_path_factory.mktemp("faults")
    dataset = make_demo_dataset(tmp / "my-images", "k4s4", DEMO_COUNTS, seed=0)
    run = tmp / "run"
    command = ["experiment=demo_quick", "demo=false", f"concepts.0.path={dataset}", "stage=train",
               f"training.epochs={EPOCHS}", f"hydra.run.dir={run}"]
    chain = Chain(run, dataset, digest(dataset), command, {})
    for kill in kill_points():
        run_and_kill(chain, kill, tmp)
    out = run_cli(*command)
    chain.outputs.append(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    chain.plan = json.loads((run / "plan.json").read_text())
    return chain


@pytest.mark.timeout(3600)
def test_every_kill_point_resumes_to_the_planned_checkpoints(chain):
    print(f"{len(chain.hit)} kill points: " + "; ".join(chain.hit))
    assert len(chain.hit) == len(kill_points())
    training = chain.run / "training"
    finished = checkpoint_dirs(training)
    assert list(finished) == chain.plan["checkpoint_steps"] == list(range(2, STEPS + 1, 2))
    assert all((p / ".guard").is_file() for p in finished.values())
    assert (training / "pytorch_lora_weights.safetensors").is_file()
    assert not list(training.glob("checkpoint-*-tmp"))


def test_earlier_checkpoints_are_byte_identical(chain):
    assert chain.kept, "no checkpoint was finished before a kill"
    assert {name: digest(chain.run / "training" / name) for name in chain.kept} == chain.kept


def test_no_stale_lock_or_process_and_the_dataset_is_untouched(chain):
    assert not training_elsewhere(chain.run)
    assert not list(chain.run.rglob(".*.tmp")), "a half-written file was left"
    assert digest(chain.dataset) == chain.dataset_before
    done = run_cli(*chain.command)
    assert done.returncode == 0 and "training already complete" in done.stdout, done.stderr[-2000:]


EVAL_KILLS = ((signal.SIGKILL, 3), (signal.SIGTERM, 5))  # (signal, after how many more cells)


@dataclass
class EvalChain:
    command: List[str]
    kept: Dict[tuple, str]  # cell key -> sha256 of its image, in eval/ when SIGTERM stopped the evaluation
    hit: List[str]
    final: subprocess.CompletedProcess


def cell_images(eval_dir: Path) -> Dict[tuple, str]:
    """sha256 of each cell's image in eval/cells.json, by (label, prompt index, seed)."""
    cells = json.loads((eval_dir / "cells.json").read_text())
    return {(c["label"], c["prompt_index"], c["seed"]): hashlib.sha256((eval_dir / c["paths"][0]).read_bytes())
            .hexdigest() for c in cells if c["status"] == "ok"}


def stop_evaluation(command: List[str], server: StandIn, sig: signal.Signals, cells: int, log: Path) -> int:
    """Start stage=eval, send `sig` to sd3exp once its progress bar counts `cells` finished cells (the
    server first finishes what a killed sd3exp left in its queue, as ComfyUI does). TQDM_MININTERVAL=0:
    on a file the bar otherwise prints a line only every 10 s."""
    deadline = time.monotonic() + WAIT_S
    while server.queue_state() != {"queue_running": [], "queue_pending": []} and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3exp", *command], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "TQDM_MININTERVAL": "0"})
    while proc.poll() is None and time.monotonic() < deadline and max(
            map(int, re.findall(r"comfyui:\s+\d+%\|[^|]*\|\s*(\d+)/", log.read_text())), default=0) < cells:
        time.sleep(0.02)
    assert proc.poll() is None, f"the evaluation ended before {sig.name}:\n{log.read_text()[-2000:]}"
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@pytest.fixture(scope="module")
def evaluated(chain, tmp_path_factory) -> EvalChain:
    """The trained chain evaluated through the stand-in ComfyUI: SIGKILL, then SIGTERM to sd3exp while
    cells render, then the command it printed."""
    tmp = tmp_path_factory.mktemp("faults-eval")
    models = tmp / "comfy-models"
    with StandIn(tmp / "comfy-out", models_dir=models, unet_names=["sd3_medium_transformer.safetensors"],
                 delay_s=0.05) as server:
        command = [a for a in chain.command if a != "stage=train"] + [
            "stage=eval", "eval.backend=comfyui", f"eval.url={server.url}", f"eval.models_dir={models}"]
        hit, texts = [], []
        for n, (sig, cells) in enumerate(EVAL_KILLS):
            code = stop_evaluation(command, server, sig, cells, tmp / f"eval-{n}.txt")
            texts.append((tmp / f"eval-{n}.txt").read_text())
            hit.append(f"{sig.name} sd3exp during evaluation, after {cells} of its cells")
            assert code == (143 if sig == signal.SIGTERM else -sig), texts[-1][-3000:]
        assert "evaluation stopped by SIGTERM: kept" in texts[-1] and "Traceback" not in texts[-1], texts[-1][-3000:]
        again = shlex.split(re.search(r"Continue with: (.+)", texts[-1]).group(1))
        assert again[:3] == ["python", "-m", "sd3exp"] and sorted(again[3:]) == sorted(command), again
        kept = cell_images(chain.run / "eval")
        final = subprocess.run([sys.executable, *again[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return EvalChain(command, kept, hit, final)


def test_a_killed_evaluation_resumes_to_the_same_cells(chain, evaluated):
    print(f"{len(evaluated.hit)} evaluation kill points: " + "; ".join(evaluated.hit))
    assert evaluated.final.returncode == 0, evaluated.final.stdout[-2000:] + evaluated.final.stderr[-2000:]
    eval_dir = chain.run / "eval"
    done = cell_images(eval_dir)
    labels = [f"checkpoint-{s}" for s in chain.plan["checkpoint_steps"]] + ["final"]
    ev = yaml.safe_load((chain.run / "resolved.yaml").read_text())["eval"]
    wanted = {(label, i, seed) for label in labels for i in range(len(ev["prompts"])) for seed in ev["seeds"]}
    cells = json.loads((eval_dir / "cells.json").read_text())
    assert set(done) == wanted and len(cells) == len(wanted) and all(c["status"] == "ok" for c in cells)
    assert 0 < len(evaluated.kept) < len(done)
    assert {key: done[key] for key in evaluated.kept} == evaluated.kept
    assert not (chain.run / "eval.next").exists() and not list(chain.run.rglob(".*.tmp"))
    with exclusive(chain.run, "eval"):  # no stale lock: it is free
        pass


def test_images_added_after_training_started_are_a_changed_run(chain):
    """Defect 3: a dataset changed under a run is refused; forced on, a trainer that ends short of
    the new plan is a failure with the reason, never a success."""
    for i in range(4):
        (chain.dataset / f"extra{i}.png").write_bytes((chain.dataset / "0000_64x64.png").read_bytes())
        (chain.dataset / f"extra{i}.txt").write_text(f"k4s4, simple shapes, extra {i}")
    before = digest(chain.run / "training")
    out = run_cli(*chain.command)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "changed after training started" in out.stderr
    assert "trainer.new_run=true" in out.stderr and "trainer.force=true" in out.stderr
    assert digest(chain.run / "training") == before
    forced = run_cli(*chain.command, "trainer.force=true")
    print(forced.stdout[-3000:], forced.stderr[-3000:])
    assert forced.returncode != 0 and "Traceback" not in forced.stderr
    more = EPOCHS * (STEPS // EPOCHS + 2)  # 4 more squares: 2 more batches of 2 an epoch
    assert f"short of the {more} steps of plan.json" in forced.stderr and "next:" not in forced.stdout


def test_a_full_disk_during_training_is_named(tmp_path):
    """Defect 6: checkpoints on a small tmpfs; the second save runs out of space."""
    with small_disk(tmp_path / "disk", "250k") as disk:
        training = disk / "training"
        run = tmp_path / "run"
        out = run_cli("experiment=demo_quick", "stage=train", f"hydra.run.dir={run}", f"paths.training_dir={training}")
        assert out.returncode != 0, out.stdout[-2000:]
        assert f"no space left on {training}" in out.stderr and f"the disk mounted at {disk}" in out.stderr
        assert "the next checkpoint needs about" in out.stderr and "kept: checkpoint(s) 2" in out.stderr
        assert "Resume from checkpoint-2: " in out.stderr and "Last lines" not in out.stderr
        assert "Traceback" not in out.stderr
