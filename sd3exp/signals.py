"""SIGTERM (a scheduler, `timeout`, a closed terminal) turned into an exception, so a stage stops the
way Ctrl-C stops it and keeps what is done."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def sigterm_raises(make: Callable[[int], BaseException]) -> Iterator[None]:
    """Within: SIGTERM raises `make(signum)`; outside the main thread signals are left alone."""
    def handler(signum: int, frame: Any) -> None:
        raise make(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
