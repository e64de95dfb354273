"""<run>/live.json: what the live evaluation saw (each checkpoint's objective, failures, the early
stop), kept across resumes. A leaf module: the sweep summary reads it without the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from sd3exp.io import read_json, write_json

LIVE_FILE = "live.json"  # in the run folder


@dataclass
class Point:
    """One evaluated checkpoint's objective (None: no score, e.g. its cells failed)."""

    step: int
    value: Optional[float]


@dataclass
class LiveState:
    """live.json: what the live evaluation saw, kept across resumes."""

    points: List[Point] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    early_stop: Optional[dict] = None
    pruned: Optional[dict] = None  # the Optuna sweep's pruner stopped it: step, objective, value, trial, reason

    @classmethod
    def load(cls, path: Path) -> "LiveState":
        if not path.is_file():
            return cls()
        data = read_json(path)
        return cls([Point(**p) for p in data.get("points", [])], list(data.get("failures", [])),
                   data.get("early_stop"), data.get("pruned"))

    def save(self, path: Path) -> None:
        write_json(path, {"points": [vars(p) for p in self.points], "failures": self.failures,
                          "early_stop": self.early_stop, "pruned": self.pruned})


def early_stop_of(run_dir: Path) -> Optional[dict]:
    """The early stop recorded for a run (None when it did not stop early)."""
    return LiveState.load(run_dir / LIVE_FILE).early_stop


def pruned_of(run_dir: Path) -> Optional[dict]:
    """The prune recorded for a run (an Optuna sweep's pruner stopped it); None when it was not pruned."""
    return LiveState.load(run_dir / LIVE_FILE).pruned


def stop_of(run_dir: Path) -> Optional[dict]:
    """Why the run's training stopped before its plan: the early stop or the prune; None when neither."""
    state = LiveState.load(run_dir / LIVE_FILE)
    return state.early_stop or state.pruned
