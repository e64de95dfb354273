"""Live evaluation while SimpleTuner trains (eval.live) and early stopping (training.early_stop).

Trigger: sd3exp watches the training folder from a thread of its own process and evaluates every
finished checkpoint (the same guard as stage=eval: `checkpoint-N-tmp` folders and checkpoints without
weights are skipped), rather than SimpleTuner's --post_checkpoint_script. The script would run inside
the trainer's process tree and on its schedule (SimpleTuner waits for it on the main rank), so a
failing or slow evaluation could stop or slow training; the watcher cannot, and it needs no change to
the compiled SimpleTuner files. Evaluations are serialised (one at a time; the checkpoints saved
meanwhile are evaluated together next) and reuse every unchanged cell, as stage=eval does.

One entry: `watching(cfg, run_dir)`, a context manager around the trainer.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence

from sd3exp import console
from sd3exp.io import write_text
from sd3exp.layout import RunLayout
from sd3exp.live.state import LIVE_FILE, LiveState, Point, early_stop_of, pruned_of, stop_of  # noqa: F401 - the package's API
from sd3exp.schema import ExperimentConfig

if TYPE_CHECKING:
    from sd3exp.optuna_sweep.job import TrialReporter

POLL_S = 1.0  # how often the training folder is looked at
REFRESH_S = 10  # report.html reloads itself this often while training runs


def stalled(points: Sequence[Point], direction: str, patience: int, min_delta: float) -> Optional[str]:
    """Why training should stop: the objective has not improved by more than `min_delta` for the last
    `patience` checkpoints (in step order); None while it has, or with fewer checkpoints."""
    sign = 1.0 if direction == "max" else -1.0
    best: Optional[Point] = None
    since = 0
    for point in sorted(points, key=lambda p: p.step):
        if point.value is not None and math.isfinite(point.value) and (
                best is None or best.value is None or sign * (point.value - best.value) > min_delta):
            best, since = point, 0
        else:
            since += 1
    if best is None or since < patience:
        return None
    return (f"no improvement of more than {min_delta:g} for {since} checkpoint(s) (patience {patience}); "
            f"best step {best.step} with {best.value:.6g}")


def direction_of(cfg: ExperimentConfig, objective: str) -> str:
    from sd3exp.evaluate.select import MEASURES

    sel = cfg.eval.select
    return sel.direction if sel.direction and objective == sel.objective else MEASURES[objective][0]


def objectives(run_dir: Path, objective: str) -> List[Point]:
    """Each evaluated checkpoint's mean objective, from eval/cells.json."""
    from sd3exp.evaluate.cells import read_cells_json
    from sd3exp.evaluate.select import mean_scores

    path = RunLayout(run_dir).eval.cells
    if not path.is_file():
        return []
    cells = [{"label": c.label, "step": c.step, "status": c.status, "scores": c.scores, "memorised": c.memorised}
             for c in read_cells_json(path)]
    return [Point(c.step, c.scores.get(objective)) for c in mean_scores(cells) if c.step is not None]


def set_refresh(report: Path, on: bool) -> None:
    """Make report.html reload itself while training runs (and stop doing so when it ends)."""
    if not report.is_file():
        return
    tag = f'<meta http-equiv="refresh" content="{REFRESH_S}">\n'
    text = report.read_text(encoding="utf-8").replace(tag, "")
    write_text(report, text.replace("<head>\n", "<head>\n" + tag, 1) if on else text)


class Watcher:
    """The thread that evaluates new checkpoints while training runs, and stops a stalled run."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        self.cfg = replace(cfg, eval=replace(cfg.eval, include_final=False))
        self.run_dir = run_dir
        self.path = run_dir / LIVE_FILE
        self.report = RunLayout(run_dir).eval.report
        self.state = LiveState.load(self.path)
        self.done: set = set()
        self.closing = threading.Event()
        self.last_pass = True  # False when training was interrupted: no pass after it
        self.thread = threading.Thread(target=self.loop, name="sd3exp-live", daemon=True)
        self.reporter: Optional[TrialReporter] = None  # the Optuna trial this job reports to (sweep.optuna.trial), connected on first use

    def new_steps(self) -> List[int]:
        from sd3exp.evaluate.checkpoints import discover

        ev = self.cfg.eval
        found = discover(self.cfg.paths.training_dir, ev.every_k, ev.min_step, ev.max_step, include_final=False)
        return [c.step for c in found.checkpoints if c.step is not None and c.step not in self.done]

    def loop(self) -> None:
        while True:
            last = self.closing.is_set()  # after training ended: one last pass for the last checkpoints
            steps = [] if self.state.early_stop or self.state.pruned else self.new_steps()
            if steps and (self.last_pass or not last):
                self.evaluate(steps, live=not last)
            if last:
                set_refresh(self.report, False)  # training has ended: the report stops reloading
                return
            self.closing.wait(POLL_S)

    def evaluate(self, steps: List[int], live: bool) -> None:
        from sd3exp.evaluate.stage import evaluate

        console.info(f"live evaluation of checkpoint(s) {', '.join(map(str, steps))}")
        try:
            evaluate(self.cfg, self.run_dir)
        except Exception as err:  # a failing evaluation never stops training; it is named in the summary
            message = f"steps {', '.join(map(str, steps))}: {err}"
            self.state.failures.append(message)
            console.warn(f"live evaluation failed ({message}); training goes on")
        self.done.update(steps)
        set_refresh(self.report, live)
        self.check_stop()
        self.check_prune()
        self.state.save(self.path)

    def check_stop(self) -> None:
        stop = self.cfg.training.early_stop
        if not stop.patience:
            return
        objective = stop.objective or self.cfg.eval.select.objective
        seen = {p.step: p for p in [*self.state.points, *objectives(self.run_dir, objective)]}
        self.state.points = sorted(seen.values(), key=lambda p: p.step)
        reason = stalled(self.state.points, direction_of(self.cfg, objective), stop.patience, stop.min_delta)
        if reason and not self.closing.is_set():
            last = self.state.points[-1].step
            self.state.early_stop = {"step": last, "objective": objective, "reason": reason}
            self.stop_trainer(f"early stop at step {last}: {reason}; stopping the trainer (every checkpoint is kept)")

    def stop_trainer(self, message: str) -> None:
        """Stop the trainer as SIGTERM does, once the stop is recorded in live.json (run_training reads it
        when the trainer exits)."""
        from sd3exp.train import stop_run

        self.state.save(self.path)
        console.info(message)
        stop_run(self.run_dir, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))


    def check_prune(self) -> None:
        """In an Optuna sweep: report each evaluated checkpoint's objective (eval.select.objective) to
        the trial, and stop the trainer as early stopping does when the study's pruner says so."""
        where = self.cfg.sweep.optuna
        if where.trial is None or self.state.early_stop or self.state.pruned:
            return
        objective = self.cfg.eval.select.objective
        points = objectives(self.run_dir, objective)
        try:
            if self.reporter is None:
                from sd3exp.optuna_sweep.job import TrialReporter

                self.reporter = TrialReporter(where)
            reporter = self.reporter
            reporter.report_all(points)
            prune = reporter.should_prune()
        except Exception as err:  # the study unreachable: training goes on, the summary names it
            self.state.failures.append(f"optuna trial {where.trial}: {err}")
            console.warn(f"reporting to Optuna trial {where.trial} failed ({err}); training goes on")
            return
        if not prune or self.closing.is_set():
            return
        last = max(reporter.reported)
        value = next(p.value for p in points if p.step == last)
        self.state.pruned = {"step": last, "objective": objective, "value": value, "trial": where.trial,
                             "reason": f"Optuna's {reporter.pruner} pruned trial {where.trial} at step {last} "
                                       f"({objective} {value:.6g})"}
        reporter.mark_pruned(self.state.pruned)
        self.stop_trainer(f"pruned at step {last}: {self.state.pruned['reason']}; stopping the trainer "
                          "(every checkpoint and score is kept)")


def report_trial(cfg: ExperimentConfig, run_dir: Path) -> None:
    """After a run's evaluation, in an Optuna sweep: report each scored checkpoint the trial has not
    had yet (no pruning: training is over). A job requeued after its training had ended (Slurm
    preemption during the last evaluations: `training already complete`) trains nothing, so no watcher
    reports its later checkpoints; this does. A pruned trial reports nothing past its stop."""
    where = cfg.sweep.optuna
    if where.trial is None or cfg.eval.backend == "none" or pruned_of(run_dir):
        return
    objective = cfg.eval.select.objective
    try:
        from sd3exp.optuna_sweep.job import TrialReporter

        TrialReporter(where).report_all(objectives(run_dir, objective))
    except Exception as err:  # the study unreachable or the trial already told: the job's result stands
        console.warn(f"reporting to Optuna trial {where.trial} failed ({err})")


def check(cfg: ExperimentConfig) -> None:
    """Refuse an early-stopping set-up that could never stop, before training starts."""
    from sd3exp.errors import ConfigError
    from sd3exp.evaluate.select import MEASURES

    if cfg.sweep.optuna.trial is not None and cfg.eval.backend == "none":
        raise ConfigError("eval.backend", "none", "an Optuna trial reports each checkpoint's score, "
                          f"which eval.backend=none does not compute (trial {cfg.sweep.optuna.trial})",
                          "use eval.backend=diffusers (or comfyui): a trial's value is its best checkpoint's score")
    stop = cfg.training.early_stop
    if stop.patience < 0:
        raise ConfigError("training.early_stop.patience", stop.patience, "must be 0 (off) or more",
                          "e.g. training.early_stop.patience=3")
    if not stop.patience:
        return
    if stop.min_delta < 0 or not math.isfinite(stop.min_delta):
        raise ConfigError("training.early_stop.min_delta", stop.min_delta, "must be a finite number >= 0",
                          "e.g. training.early_stop.min_delta=0.1")
    if stop.objective is not None and stop.objective not in MEASURES:
        raise ConfigError("training.early_stop.objective", stop.objective, "not a measure sd3exp computes",
                          f"use one of {', '.join(MEASURES)}, or null for eval.select.objective")
    if cfg.eval.backend == "none" or not cfg.eval.scoring.enabled:
        raise ConfigError("training.early_stop.patience", stop.patience,
                          "early stopping needs scored checkpoints, but eval.backend=none or eval.scoring.enabled=false",
                          "use eval.backend=diffusers (or comfyui) with eval.scoring.enabled=true, "
                          "or training.early_stop.patience=0")


def enabled(cfg: ExperimentConfig) -> bool:
    """Live evaluation runs with eval.live, for early stopping and for an Optuna trial (which need the scores)."""
    return cfg.eval.backend != "none" and (cfg.eval.live or cfg.training.early_stop.patience > 0
                                           or cfg.sweep.optuna.trial is not None)


@contextlib.contextmanager
def watching(cfg: ExperimentConfig, run_dir: Path) -> Iterator[Optional[Watcher]]:
    """Evaluate checkpoints as training saves them; on a clean exit one last pass for the last ones."""
    if not enabled(cfg):
        yield None
        return
    watcher = Watcher(cfg, run_dir)
    watcher.thread.start()
    console.info(f"live evaluation: every finished checkpoint is evaluated while training runs ({run_dir / LIVE_FILE})")
    try:
        yield watcher
    except BaseException:
        watcher.last_pass = False
        raise
    finally:
        watcher.closing.set()
        watcher.thread.join()


def failure_lines(run_dir: Path) -> List[str]:
    """The live evaluations that failed, one line each."""
    return [f"live evaluation failed: {f}" for f in LiveState.load(run_dir / LIVE_FILE).failures]


def summary_lines(run_dir: Path) -> List[str]:
    """The live evaluation's failures and the early stop, for the end-of-run summary."""
    stop = stop_of(run_dir)
    return failure_lines(run_dir) + ([f"stopped early at step {stop['step']}: {stop['reason']}"] if stop else [])
