"""Run SimpleTuner on a compiled run folder: stream its log, show progress, keep runs safe."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tqdm import tqdm

from sd3exp.errors import TrainerError
from sd3exp.io import read_json, write_json
from sd3exp.runfolder import checkpoint_dirs

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"
_TQDM = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^\]]*)\]")
STATUS_EVERY_S = 0.5  # start-up log lines shown on the bar at most this often
_LOG_PREFIX = re.compile(r"^(\[RANK \d+\] \S+ \S+ \[\w+\] |[IWE]\d{4} [\d:.]+ \d+ \S+\] )")
_KV = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf)")


@dataclass
class Progress:
    """What the trainer has said so far."""

    step: int = 0
    total: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    tail: List[str] = field(default_factory=list)

    def feed(self, line: str) -> bool:
        """Take one output line; True when the step counter moved."""
        self.tail = (self.tail + [line])[-40:]
        m = _TQDM.search(line)
        if not m:
            return False
        moved = int(m.group(1)) != self.step
        self.step, self.total = int(m.group(1)), int(m.group(2))
        values = dict(_KV.findall(m.group(3)))
        self.loss = float(values["step_loss"]) if "step_loss" in values else self.loss
        self.lr = float(values["lr"]) if "lr" in values else self.lr
        return moved


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
    summary = run_dir / "training_summary.json"
    last = read_json(summary)["progress"]["step"] if summary.is_file() else 0
    return max([last, *checkpoint_dirs(training_dir)]) >= max_steps


def trainer_environment(bin_dir: Path, run_dir: Path, cpu: bool, offline: bool) -> Dict[str, str]:
    """The trainer's environment: caches inside the run, the CPU shim only without CUDA."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_CACHE"] = env.get("HF_HUB_CACHE") or str(Path(env.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    cache = run_dir / ".cache"
    env.update(HF_HOME=str(run_dir / ".hf"), MPLCONFIGDIR=str(run_dir / ".mpl"), XDG_CACHE_HOME=str(cache),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), PYTHONUNBUFFERED="1")
    for key in ("CONFIG_BACKEND", "SIMPLETUNER_CONFIG_BACKEND", "ENV", "SIMPLETUNER_ENV", "CONFIG_PATH"):
        env.pop(key, None)
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if cpu:
        env["SDNQ_USE_TORCH_COMPILE"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_DIR), env.get("PYTHONPATH")]))
    return env


def _lines(stream, log) -> "iter[str]":
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


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C: SIGINT to the trainer's process group, then TERM, then KILL."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@dataclass
class TrainResult:
    exit_code: int
    seconds: float
    start_step: int
    progress: Progress
    checkpoints: Dict[int, str]
    log: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["progress"].pop("tail")
        return d


def follow(stream, log, bar: tqdm, progress: Progress, on_first_step: Callable[[], None] = lambda: None) -> None:
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


def launch(cmd: List[str], run_dir: Path, training_dir: Path, env: Dict[str, str], total: int,
           start_step: int, on_first_step: Callable[[], None]) -> TrainResult:
    """Start the trainer in the run folder and follow it until it exits."""
    log_path = run_dir / "train.log"
    progress, started = Progress(step=start_step), time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n===== sd3exp: {' '.join(cmd)} (cwd {run_dir}) =====\n".encode())
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        bar = tqdm(total=total, initial=start_step, unit="step", desc="train", dynamic_ncols=True)
        try:
            follow(proc.stdout, log, bar, progress, on_first_step)
            code = proc.wait()
        except KeyboardInterrupt:
            stop(proc)
            code = 130
        except SystemExit:  # Slurm preemption/time limit: submitit requeued the job and exits this process
            stop(proc)
            raise
        finally:
            bar.close()
    ckpts = {s: str(p) for s, p in checkpoint_dirs(training_dir).items()}
    return TrainResult(code, time.monotonic() - started, start_step, progress, ckpts, str(log_path))


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


def failure_message(result: TrainResult, resume_command: str) -> str:
    if result.exit_code == 130:
        latest = max(result.checkpoints) if result.checkpoints else None
        where = f"checkpoint-{latest}" if latest else "the start (no checkpoint yet)"
        return f"training stopped by Ctrl-C at step {result.progress.step}. Resume from {where}: {resume_command}"
    tail = "\n".join("  " + ln for ln in result.progress.tail[-20:])
    return (f"SimpleTuner exited with status {result.exit_code}. Last lines:\n{tail}\n"
            f"Full log: {result.log}")


def run_training(cmd: List[str], run_dir: Path, training_dir: Path, env: Dict[str, str], total: int,
                 planned: List[int], next_command: Optional[str], resume_command: str,
                 on_first_step: Callable[[], None]) -> TrainResult:
    start = max(checkpoint_dirs(training_dir), default=0)
    if start:
        print(f"resuming from checkpoint-{start} (SimpleTuner resume_from_checkpoint=latest)")
    result = launch(cmd, run_dir, training_dir, env, total, start, on_first_step)
    write_json(run_dir / "training_summary.json", result.to_dict())
    print(report(result, planned, total, next_command))
    if result.exit_code != 0:
        err = TrainerError(failure_message(result, resume_command))
        err.exit_code = result.exit_code
        raise err
    return result
