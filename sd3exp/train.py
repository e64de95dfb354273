"""Run SimpleTuner on a compiled run folder: stream its log, show progress, keep runs safe."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from sd3exp import console, hub
from sd3exp.errors import DiskFullError, Interrupted, RunConflictError, TrainerError, no_space_message
from sd3exp.io import read_json, write_json
from sd3exp.layout import RunLayout
from sd3exp.runfolder import checkpoint_dirs
from sd3exp.signals import Stopped, described, signum_of, sigterm_raises

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"
_TQDM = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^\]]*)\]")
STATUS_EVERY_S = 0.5  # start-up log lines shown on the bar at most this often
_LOG_PREFIX = re.compile(r"^(\[RANK \d+\] \S+ \S+ \[\w+\] |[IWE]\d{4} [\d:.]+ \d+ \S+\] )")
_KV = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TORCH_INFO = re.compile(r"^(\[RANK \d+\] )?[IV]\d{4} [\d:.]+ \d+ \S+\] ")  # glog INFO lines (TorchDynamo, Inductor)
_BAR = re.compile(r"\d+%\|")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit): \S")
_LAUNCHER = ("CalledProcessError", "KeyboardInterrupt")  # accelerate's and the CLI's own, not the trainer's
_TRACE_START = ("Traceback (most recent call last)", "During handling of the above exception",
                "The above exception was the direct cause")
TAIL_SHOWN = 12
# SimpleTuner's line after the final save (a LoRA's weights, or the full pipeline), not a checkpoint's
_FINAL_SAVE = re.compile(r"Model weights saved in (?!\S*checkpoint-)\S*pytorch_lora_weights\.safetensors|Wrote pipeline to disk: ")


@dataclass
class Progress:
    """What the trainer has said so far."""

    step: int = 0
    total: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    tail: List[str] = field(default_factory=list)
    saved_final: bool = False  # SimpleTuner said it finished saving the final weights

    def feed(self, line: str) -> bool:
        """Take one output line; True when the step counter moved."""
        self.tail = (self.tail + [line])[-200:]
        self.saved_final = self.saved_final or bool(_FINAL_SAVE.search(line))
        m = _TQDM.search(line)
        if not m:
            return False
        moved = int(m.group(1)) != self.step
        self.step, self.total = int(m.group(1)), int(m.group(2))
        values = dict(_KV.findall(m.group(3)))
        self.loss = float(values["step_loss"]) if "step_loss" in values else self.loss
        self.lr = float(values["lr"]) if "lr" in values else self.lr
        return moved


def meaningful(lines: List[str], keep: int = TAIL_SHOWN) -> List[str]:
    """The trainer's last lines worth showing: without colour codes, blank lines, torch's INFO log
    lines (TorchDynamo/Inductor registering templates) and every progress bar but the last."""
    clean = [t for t in (_ANSI.sub("", line).strip() for line in lines) if t and not _TORCH_INFO.match(t)]
    last_bar = max((i for i, t in enumerate(clean) if _BAR.search(t)), default=-1)
    return [t for i, t in enumerate(clean) if i == last_bar or not _BAR.search(t)][-keep:]


def trainer_error(lines: List[str], keep: int = 2 * TAIL_SHOWN) -> List[str]:
    """The trainer's own exception (`ValueError: ...` and the lines of its message), the last one
    raised before the launcher's CalledProcessError; [] when there is none."""
    clean = [_LOG_PREFIX.sub("", _ANSI.sub("", line)).rstrip() for line in lines
             if not _TORCH_INFO.match(_ANSI.sub("", line))]
    starts = [i for i, t in enumerate(clean) if _EXCEPTION.match(t) and not t.split(":", 1)[0].endswith(_LAUNCHER)]
    if not starts:
        return []
    block: List[str] = []
    for t in clean[starts[-1]:]:
        if t.startswith(_TRACE_START) or (block and _EXCEPTION.match(t)):
            break
        if t.strip():
            block.append(t)
    return block[:keep]


def status_text(line: str, width: int = 48) -> str:
    """A log line shortened for the bar while SimpleTuner loads models and fills its caches."""
    text = _LOG_PREFIX.sub("", re.sub(r"\x1b\[[0-9;]*m", "", line)).strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def final_weights(training_dir: Path, model_type: str) -> Path:
    return training_dir / ("pytorch_lora_weights.safetensors" if model_type == "lora" else "pipeline")


def is_complete(run_dir: Path, training_dir: Path, model_type: str, max_steps: int) -> bool:
    """Training reached max_steps and saved its final weights: calling SimpleTuner again would
    retrain the last step and overwrite them."""
    if not final_weights(training_dir, model_type).exists():
        return False
    summary = RunLayout(run_dir).training_summary
    last = read_json(summary)["progress"]["step"] if summary.is_file() else 0
    return max([last, *checkpoint_dirs(training_dir)]) >= max_steps


def trainer_environment(bin_dir: Path, run_dir: Path, cpu: bool, offline: bool) -> Dict[str, str]:
    """The trainer's environment: caches inside the run, the CPU shim only without CUDA. HF_HOME is
    run-private so that the user's accelerate default_config.yaml ($HF_HOME/accelerate) cannot change
    the compiled launch; the user's login (HF_TOKEN, the token file) and hub cache stay visible."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(hub.user_hub_env(os.environ))
    cache = run_dir / ".cache"
    env.update(HF_HOME=str(run_dir / ".hf"), MPLCONFIGDIR=str(run_dir / ".mpl"), XDG_CACHE_HOME=str(cache),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), PYTHONUNBUFFERED="1")
    env[MARK] = str(run_dir)
    for key in ("CONFIG_BACKEND", "SIMPLETUNER_CONFIG_BACKEND", "ENV", "SIMPLETUNER_ENV", "CONFIG_PATH"):
        env.pop(key, None)
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if cpu:
        env["SDNQ_USE_TORCH_COMPILE"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_DIR), env.get("PYTHONPATH")]))
    return env


def _lines(stream, log) -> Iterator[str]:
    """Yield output lines split on \\n and \\r (tqdm), copying raw bytes to the log."""
    pending = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        log.write(chunk)
        log.flush()
        pending += chunk
        parts = re.split(rb"[\r\n]", pending)
        pending = parts.pop()
        for part in parts:
            if part.strip():
                yield part.decode("utf-8", "replace")
    if pending.strip():
        yield pending.decode("utf-8", "replace")


MARK = "SD3EXP_TRAINING"  # in the trainer's environment: the run folder it trains


def run_processes(run_dir: Path) -> List[int]:
    """The trainer processes of `run_dir`: the one sd3exp started and those it started in sessions
    of their own (SimpleTuner's `train` runs accelerate under setsid), orphaned or not."""
    mark = f"\0{MARK}={run_dir}\0".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and mark in b"\0" + (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)


def stop_run(run_dir: Path, steps: Tuple[Tuple[int, float], ...]) -> None:
    """Each (signal, wait) in turn to every trainer process group of the run, until none is left."""
    for sig, wait in steps:
        pids = run_processes(run_dir)
        if not pids:
            return
        _signal_all(pids, sig)
        end = time.monotonic() + wait
        while run_processes(run_dir) and time.monotonic() < end:
            time.sleep(0.2)


SIGINT_GRACE_S = 10  # SimpleTuner 4.10.1 trains on for 30 s and more after SIGINT; TERM stops it at once


def stop(proc: subprocess.Popen, run_dir: Path) -> None:
    """Ctrl-C: SIGINT to the trainer's process group, then TERM and KILL to every trainer process
    of the run that is left (the training process runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(SIGINT_GRACE_S)
    stop_run(run_dir, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    proc.wait()


def reap_when_killed(proc: subprocess.Popen, run_dir: Path) -> threading.Thread:
    """When the trainer dies by a signal, stop what it started (else it trains on, unwatched)."""
    def watch() -> None:
        if proc.wait() < 0:
            stop_run(run_dir, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@dataclass
class TrainResult:
    exit_code: int
    seconds: float
    start_step: int
    progress: Progress
    checkpoints: Dict[int, str]
    log: str
    stopped_by: Optional[str] = None  # what stopped sd3exp during training: "Ctrl-C", "SIGTERM"
    killed_by: Optional[str] = None  # the signal that killed the trainer, e.g. "SIGKILL"
    early_stop: Optional[dict] = None  # training.early_stop stopped it: step, objective, reason (sd3exp/live/)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["progress"].pop("tail")
        return d


def follow(stream, log, bar: console.Bar, progress: Progress, on_first_step: Callable[[], None] = lambda: None) -> None:
    """Copy the trainer's output to the log and move the bar; before the first step the bar
    shows what SimpleTuner is doing (loading models, filling caches). `on_first_step` is called
    at every line from SimpleTuner's first step bar on (its caches are complete by then)."""
    start, shown = progress.step, 0.0
    for line in _lines(stream, log):
        moved = progress.feed(line)
        if progress.total is not None:
            on_first_step()
        if moved:
            if progress.total != bar.total:
                bar.total = progress.total
            bar.update(progress.step - bar.n)
            values = {"loss": progress.loss, "lr": progress.lr}
            bar.set_postfix({k: v for k, v in values.items() if v is not None}, refresh=False)
        elif progress.step == start and time.monotonic() - shown > STATUS_EVERY_S:
            bar.set_postfix_str(status_text(line))
            shown = time.monotonic()


def stop_quietly(proc: subprocess.Popen, run_dir: Path) -> None:
    """stop() with further SIGINT/SIGTERM ignored until the trainer's groups are gone."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop(proc, run_dir)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def launch(cmd: List[str], run_dir: Path, training_dir: Path, env: Dict[str, str], total: int,
           start_step: int, on_first_step: Callable[[], None]) -> TrainResult:
    """Start the trainer in the run folder and follow it until it exits; Ctrl-C or SIGTERM stop it
    (exit status 128 + the signal), as does a full disk for train.log."""
    log_path = RunLayout(run_dir).train_log
    progress, started = Progress(step=start_step), time.monotonic()
    stopped_by = killed_by = None
    with sigterm_raises(Stopped), open(log_path, "ab") as log:
        log.write(f"\n===== sd3exp: {' '.join(cmd)} (cwd {run_dir}) =====\n".encode())
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        bar = console.progress(total=total, initial=start_step, unit="step", desc="train", dynamic_ncols=True)
        watcher = reap_when_killed(proc, run_dir)
        try:
            follow(proc.stdout, log, bar, progress, on_first_step)
            code = proc.wait()
            watcher.join()
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Stopped)
            stop_quietly(proc, run_dir)
            code, stopped_by = 128 + signum_of(err), described(signum_of(err))
        except SystemExit:  # Slurm preemption/time limit: submitit requeued the job and exits this process
            stop_quietly(proc, run_dir)
            raise
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            stop_quietly(proc, run_dir)
            code = 1
            progress.tail.append(f"sd3exp: writing {log_path}: No space left on device")
        finally:
            bar.close()
    if code < 0:
        code, killed_by = 128 - code, signal_name(-code)
    ckpts = {s: str(p) for s, p in checkpoint_dirs(training_dir).items()}
    return TrainResult(code, time.monotonic() - started, start_step, progress, ckpts, str(log_path),
                       stopped_by, killed_by)


def report(result: TrainResult, planned: List[int], planned_total: int, next_command: Optional[str]) -> str:
    """The end-of-training summary table."""
    p = result.progress
    rows = [("steps done", f"{p.step} (from {result.start_step})" + (f" of {p.total}" if p.total else "")),
            ("time", f"{result.seconds:.1f} s"),
            ("final loss", f"{p.loss:.4f}" if p.loss is not None else "-"),
            ("checkpoints", f"{len(result.checkpoints)} of {len(planned)} planned"),
            ("log", result.log)]
    rows += [(f"  step {s}", path) for s, path in result.checkpoints.items()]
    lines = [f"{k:<14} {v}" for k, v in rows]
    if p.total and p.total != planned_total:
        lines.append(f"warning: SimpleTuner planned {p.total} steps, plan.json {planned_total}: the checkpoints "
                     "differ from plan.json (please report this with plan.json and train.log)")
    if result.exit_code == 0 and next_command:
        lines.append(f"next: {next_command}")
    return "\n".join(lines)


def kept(result: TrainResult) -> str:
    steps = ", ".join(map(str, result.checkpoints))
    return f"kept: checkpoint(s) {steps}" if steps else "no checkpoint was written yet"


def resume_hint(result: TrainResult, resume_command: str) -> str:
    latest = max(result.checkpoints) if result.checkpoints else None
    return f"Resume from {f'checkpoint-{latest}' if latest else 'the start (no checkpoint yet)'}: {resume_command}"


def disk_full(result: TrainResult, training_dir: Path) -> Optional[str]:
    """The message for a trainer that ran out of disk space; None when it did not. torch.save on a
    full disk says only 'iostream error', so the free space is checked as well as the log."""
    log = Path(result.log)
    text = log.read_text(errors="replace").rsplit("===== sd3exp:", 1)[-1] if log.is_file() else ""
    latest = max(result.checkpoints) if result.checkpoints else None
    need = (sum(f.stat().st_size for f in Path(result.checkpoints[latest]).rglob("*") if f.is_file())
            if latest else None)
    said = "No space left on device" in text + "\n".join(result.progress.tail)
    for folder in (training_dir, log.parent):
        if said or (folder.is_dir() and shutil.disk_usage(folder).free < max(need or 0, 1 << 20)):
            return no_space_message(folder, need, "the next checkpoint")
    return None


def failure_message(result: TrainResult, resume_command: str, training_dir: Path) -> str:
    step = max([result.progress.step, *result.checkpoints])  # it may save after the last line read
    if result.stopped_by:
        return (f"training stopped by {result.stopped_by} at step {step}; {kept(result)}. "
                + resume_hint(result, resume_command))
    full = disk_full(result, training_dir)
    if full:
        return f"training failed: {full}; {kept(result)}. Full log: {result.log}. Then: {resume_hint(result, resume_command)}"
    tail = "\n".join("  " + ln for ln in meaningful(result.progress.tail))
    if result.killed_by:
        return (f"SimpleTuner was killed by {result.killed_by} at step {step} (by another process, or by the "
                f"kernel when memory ran out); {kept(result)}. Last lines:\n{tail}\nFull log: {result.log}\n"
                + resume_hint(result, resume_command))
    own = "\n".join("  " + ln for ln in trainer_error(result.progress.tail))
    said = f" SimpleTuner's error:\n{own}\n" if own else " "
    return (f"SimpleTuner exited with status {result.exit_code}.{said}Last lines:\n{tail}\n"
            f"Full log: {result.log}")


def short_of_plan(result: TrainResult, total: int) -> str:
    """Why a trainer that exited 0 without reaching the plan failed."""
    p = result.progress
    planned = f"; SimpleTuner itself planned {p.total} steps" if p.total and p.total != total else ""
    return (f"SimpleTuner exited with status 0 at step {p.step}, short of the {total} steps of plan.json{planned}: "
            "the run is not finished (did the dataset or the step count change after training started?). "
            f"Fix: train it in a new run folder (trainer.new_run=true). Full log: {result.log}")


def run_training(cmd: List[str], run_dir: Path, training_dir: Path, env: Dict[str, str], total: int,
                 planned: List[int], next_command: Optional[str], resume_command: str,
                 model_type: str, on_first_step: Callable[[], None],
                 stopped_early: Callable[[], Optional[dict]] = lambda: None) -> TrainResult:
    start = max(checkpoint_dirs(training_dir), default=0)
    if start:
        console.info(f"resuming from checkpoint-{start} (SimpleTuner resume_from_checkpoint=latest)")
    left = run_processes(run_dir)
    if left:
        raise RunConflictError(
            f"a trainer started by an earlier sd3exp is still running in {run_dir} (pid {', '.join(map(str, left))}); "
            f"a second one would train the same run. Fix: wait for it to end, or stop it: kill -INT {left[0]}")
    result = launch(cmd, run_dir, training_dir, env, total, start, on_first_step)
    result.early_stop = stopped_early()
    try:
        write_json(RunLayout(run_dir).training_summary, result.to_dict())
    except DiskFullError as err:
        console.warn(str(err))
    if result.early_stop and result.stopped_by is None:
        console.info(report(result, planned, total, next_command))
        console.info(f"stopped early at step {result.early_stop['step']}: {result.early_stop['reason']}")
        return result
    if result.stopped_by and result.progress.saved_final and is_complete(run_dir, training_dir, model_type, total):
        console.info(report(result, planned, total, None))
        raise Interrupted(f"training had finished (all {total} steps; the final weights are saved in "
                          f"{final_weights(training_dir, model_type)}) when {result.stopped_by} stopped sd3exp: "
                          f"nothing is lost; {kept(result)} and the final weights. "
                          f"Continue with: {next_command or resume_command}", result.exit_code - 128)
    short = result.exit_code == 0 and not is_complete(run_dir, training_dir, model_type, total)
    console.info(report(result, planned, total, None if short else next_command))
    if result.exit_code != 0 or short:
        failed = TrainerError(short_of_plan(result, total) if short else
                              failure_message(result, resume_command, training_dir))
        failed.exit_code = result.exit_code or 1
        raise failed
    return result
