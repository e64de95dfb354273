"""SIGTERM inside a stage: Stopped where nobody else handles it, left to a handler already installed
(submitit's under Slurm requeues a preempted job; evaluation and captioning once replaced it)."""

from __future__ import annotations

import os
import signal

import pytest

from sd3exp.signals import Stopped, sigterm_raises


@pytest.fixture
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_stopped_within_and_the_default_comes_back(default_sigterm):
    with pytest.raises(Stopped) as stop, sigterm_raises(Stopped):
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_handler_installed_before_gets_sigterm_at_every_depth(default_sigterm):
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # as submitit does
    with sigterm_raises(Stopped):  # the pipeline
        with sigterm_raises(Stopped):  # evaluation, captioning, training inside it
            os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]


def test_an_outer_stage_handler_is_the_one_that_raises(default_sigterm):
    with pytest.raises(Stopped), sigterm_raises(Stopped):
        with sigterm_raises(lambda signum: AssertionError("the inner stage replaced the outer handler")):
            os.kill(os.getpid(), signal.SIGTERM)
