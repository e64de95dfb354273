"""Progress bars for sd3exp.console.progress: tqdm as it is on a terminal; on a file or a pipe
(`make demo > log`) one plain line at most every `PLAIN_EVERY_S` seconds (tqdm's own
TQDM_MININTERVAL when set) and the last state when it ends, instead of carriage-return updates that
pile up on one line. A module of its own so that only a command that shows a bar loads tqdm.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Iterable, Optional, TextIO

from tqdm import tqdm

PLAIN_EVERY_S = 10.0  # a bar on a file or pipe prints at most one line this often
PLAIN_COLUMNS = 100  # and no line wider than this

# tqdm's default lock pairs a thread lock with a multiprocessing one, for bars shared with forked children;
# sd3exp's bars live in one process: a thread lock spares the first bar importing multiprocessing (4 ms)
tqdm.set_lock(threading.RLock())


class _LogLines:
    """A file for a bar in plain mode: what tqdm writes to end or clear its line is dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def plain_every_s() -> float:
    """How often a bar on a file prints a line: TQDM_MININTERVAL (tqdm's variable) if set, else PLAIN_EVERY_S."""
    try:
        return max(0.0, float(os.environ["TQDM_MININTERVAL"]))
    except (KeyError, ValueError):
        return PLAIN_EVERY_S


class PlainBar(tqdm):
    """A bar for a log file: a plain line at most every `mininterval` seconds, and the last state."""

    def __init__(self, *args: Any, file: TextIO, **kwargs: Any) -> None:
        self._printed_at: Optional[float] = None
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("mininterval", plain_every_s())
        super().__init__(*args, file=_LogLines(file), ncols=PLAIN_COLUMNS, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        """Print the bar as a line, unless one was printed less than `mininterval` ago (tqdm's close()
        disables the bar before its last display: that one is always printed)."""
        if msg == "":
            return True  # clearing a line: nothing to take back in a log
        now = self._time()
        if not self.disable and self._printed_at is not None and now - self._printed_at < self.mininterval:
            return True
        self._printed_at = now
        self.fp.write(f"{self if msg is None else msg}\n")
        self.fp.flush()
        return True


def progress_bar(iterable: Optional[Iterable] = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal, a PlainBar on anything else."""
    file = kwargs.pop("file", None) or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, file=file, **kwargs)
    return PlainBar(iterable, file=file, **kwargs)
