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

    @classmethod
    def load(cls, path: Path) -> "LiveState":
        if not path.is_file():
            return cls()
        data = read_json(path)
        return cls([Point(**p) for p in data.get("points", [])], list(data.get("failures", [])),
                   data.get("early_stop"))

    def save(self, path: Path) -> None:
        write_json(path, {"points": [vars(p) for p in self.points], "failures": self.failures,
                          "early_stop": self.early_stop})


def early_stop_of(run_dir: Path) -> Optional[dict]:
    """The early stop recorded for a run (None when it did not stop early)."""
    return LiveState.load(run_dir / LIVE_FILE).early_stop
