"""The exceptions sd3exp raises on purpose; anything else is a bug."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence


class Sd3expError(Exception):
    """Base class: the CLI prints these as one paragraph and exits non-zero."""

    exit_code = 2


class ConfigError(Sd3expError):
    """An experiment value is invalid: names the field, the value and the fix."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")

    def __reduce__(self) -> Any:  # pickled with a failed job's result (submitit, Slurm): rebuilt from its fields
        return type(self), (self.field, self.value, self.problem, self.fix)


class ConfigErrors(ConfigError):
    """Several independent experiment values are invalid: every one of them, a line each."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        first = errors[0]
        self.errors = list(errors)
        self.field, self.value, self.problem, self.fix = first.field, first.value, first.problem, first.fix
        Sd3expError.__init__(self, f"{len(errors)} problems in the experiment:\n" + "\n".join(f"  {e}" for e in errors))

    def __reduce__(self) -> Any:
        return type(self), (self.errors,)


class UnsafeValueError(ConfigError):
    """A value would mean something else to bash or to SimpleTuner's parsers."""


class DatasetError(Sd3expError):
    """The dataset on disk cannot be used as declared."""


class RunConflictError(Sd3expError):
    """Writing here would overwrite or mix with another run's files."""


class TrainerError(Sd3expError):
    """The trainer is missing, rejected the configuration, or failed."""


class EvalError(Sd3expError):
    """The checkpoint evaluation could not run."""


class Interrupted(Sd3expError):
    """Ctrl-C or SIGTERM stopped a stage: the message says what was kept and the command that
    continues; exit status 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self) -> Any:
        return type(self), (self.args[0], self.signum)


class DiskFullError(Sd3expError):
    """A write failed because the disk is full (ENOSPC)."""


def human_bytes(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def no_space_message(path: Path, need: Optional[int] = None, what: str = "the next write") -> str:
    """'no space left on <path>' with the disk's mount point, its free space and what is needed."""
    mount = Path(os.path.abspath(path))
    while not mount.exists() or not os.path.ismount(mount):
        mount = mount.parent
    free = human_bytes(shutil.disk_usage(mount).free)
    needs = f"; {what} needs about {human_bytes(need)}" if need else ""
    return (f"no space left on {path} (the disk mounted at {mount} has {free} free{needs}). Fix: free space "
            "there, or point paths.output_root (or hydra.run.dir) at a disk with room")
