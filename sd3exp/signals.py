"""SIGTERM (a scheduler, `timeout`, a closed terminal) turned into an exception, so a stage stops the
way Ctrl-C stops it and keeps what is done."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

from sd3exp.errors import Interrupted


class Stopped(KeyboardInterrupt):
    """A signal other than Ctrl-C (SIGTERM) that stops a stage the way Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signum_of(exc: KeyboardInterrupt) -> int:
    """The signal behind a Ctrl-C or a Stopped."""
    return getattr(exc, "signum", signal.SIGINT)


def described(signum: int) -> str:
    """'Ctrl-C' for SIGINT, the signal's name otherwise."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def stopped(exc: KeyboardInterrupt, doing: str, kept: str, again: str) -> Interrupted:
    """Ctrl-C or SIGTERM: what was kept and the command that continues, exit 128 + the signal."""
    signum = signum_of(exc)
    return Interrupted(f"{doing} stopped by {described(signum)}: {kept}. Continue with: {again}", signum)


@contextlib.contextmanager
def sigterm_raises(make: Callable[[int], BaseException]) -> Iterator[None]:
    """Within: SIGTERM raises `make(signum)`, unless a handler is installed already (an outer stage's,
    or submitit's under Slurm, which requeues a preempted job and would otherwise see its job stopped);
    outside the main thread signals are left alone."""
    def handler(signum: int, frame: Any) -> None:
        raise make(signum)

    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
