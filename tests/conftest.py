"""pytest's hooks; the helpers the tests share are in tests/helpers.py."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import NO_TRAINER


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C back where the suite was started with SIGINT ignored (a non-interactive shell's `make test &`):
    the Ctrl-C tests interrupt the suite's own thread and the sd3exp processes it starts, which inherit
    an ignored SIGINT (all five failed that way)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_trainer"):
        item.add_marker(pytest.mark.trainer)
        if NO_TRAINER:
            item.add_marker(pytest.mark.skip(reason="the SimpleTuner trainer venv is not installed (make trainer)"))
