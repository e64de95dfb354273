"""What the user sees: messages on the "sd3exp" logger (`info`, `warn`) and progress bars (`progress`).

Messages print as plain lines on stdout, through a handler of the "sd3exp" logger that writes to
whatever sys.stdout is at the time (so pytest's capsys sees them; caplog does too). A bar on a
terminal is tqdm as it is; on a file or a pipe it prints plain lines (sd3exp/bars.py).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Iterable, Optional, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm as Bar  # what `progress` returns

log = logging.getLogger("sd3exp")


class _Stdout(logging.StreamHandler):
    """Plain messages on the current sys.stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler sets it; the current stdout is used instead
        pass


if not any(isinstance(h, _Stdout) for h in log.handlers):
    log.addHandler(_Stdout())
log.setLevel(logging.INFO)
log.propagate = False  # Hydra's stdout handler on the root logger would print each message twice


def info(message: str) -> None:
    """A fact for the user, as a plain line on stdout."""
    log.info(message)


def warn(message: str) -> None:
    """A warning for the user: "warning: <message>" on stdout."""
    log.warning(f"warning: {message}")


def progress(iterable: Optional[Iterable] = None, **kwargs: Any) -> Bar:
    """The project's progress bar: tqdm(iterable, **kwargs) on a terminal, a plain-line bar on anything
    else (sd3exp/bars.py, loaded with the first bar)."""
    from sd3exp.bars import progress_bar

    return progress_bar(iterable, **kwargs)
