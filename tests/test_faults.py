"""Fault injection: SIGKILL and SIGTERM to sd3exp and to the trainer at several points of a demo run
(the prepare stage, training, a checkpoint save), each followed by the re-run a user would type.

After the last re-run the run has the checkpoint steps of an uninterrupted run (plan.json; the e2e
test checks those against a real uninterrupted run), every checkpoint finished before a kill is
byte-identical, no lock or trainer process is left, and the user's dataset is byte-identical.
"""

from __future__ import annotations

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

from sd3exp.project import ROOT
from sd3exp.demo import DEMO_COUNTS
from sd3exp.demo_data import make_demo_dataset
from sd3exp.runfolder import checkpoint_dirs, training_elsewhere
from sd3exp.train import run_processes
from tests.conftest import needs_trainer, run_cli
from tests.test_user_safety import small_disk

pytestmark = [needs_trainer, pytest.mark.trainer, pytest.mark.slow]

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


def latest(run: Path) -> int:
    return max(checkpoint_dirs(run / "training"), default=0)


def new_checkpoint(run: Path, start: int) -> bool:
    return latest(run) > start


def kill_points() -> List[Kill]:
    return [
        Kill("SIGKILL sd3exp after the audit (prepare, trainer preflight)", "sd3exp", signal.SIGKILL,
             lambda run, start: (run / "audit.json").is_file(), None, in_training=False),
        Kill("SIGTERM sd3exp during training", "sd3exp", signal.SIGTERM, new_checkpoint, 143,
             "training stopped by SIGTERM"),
        Kill("SIGKILL the trainer during a checkpoint save", "trainer", signal.SIGKILL,
             lambda run, start: saving(run) or latest(run) > start + 2, 137, "SimpleTuner was killed by SIGKILL"),
        Kill("SIGKILL sd3exp during training", "sd3exp", signal.SIGKILL, new_checkpoint, None),
        Kill("SIGTERM the trainer during training", "trainer", signal.SIGTERM, new_checkpoint, 143,
             "SimpleTuner was killed by SIGTERM"),
    ]


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
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before '{kill.name}':\n{log.read_text()[-2000:]}"
    pgid = pgid or trainer_pid(proc.pid)
    chain.kept.update({p.name: digest(p) for p in checkpoint_dirs(chain.run / "training").values()
                       if (p / ".guard").exists()})
    if kill.target == "sd3exp":
        proc.send_signal(kill.sig)
    else:
        assert pgid, f"no trainer process to kill for '{kill.name}'"
        os.killpg(pgid, kill.sig)
    code = proc.wait(timeout=300)
    text = log.read_text()
    chain.outputs.append(text)
    chain.hit.append(kill.name + (" (in the save)" if "save" in kill.name and saving(chain.run) else ""))
    if kill.exit_code is not None:
        assert code == kill.exit_code, text[-3000:]
        assert kill.message in text and "Traceback" not in text, text[-3000:]
        hint = shlex.split(re.search(r"Resume from [^:]+: (.+)", text).group(1))
        assert hint[:3] == ["python", "-m", "sd3exp"] and sorted(hint[3:]) == sorted(chain.command), hint
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
