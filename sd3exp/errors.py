"""The exceptions sd3exp raises on purpose; anything else is a bug."""

from __future__ import annotations

from typing import Any


class Sd3expError(Exception):
    """Base class: the CLI prints these as one paragraph and exits non-zero."""

    exit_code = 2


class ConfigError(Sd3expError):
    """An experiment value is invalid: names the field, the value and the fix."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")


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
