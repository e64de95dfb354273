"""pytest's hooks; the helpers the tests share are in tests/helpers.py."""

from __future__ import annotations

import functools
import signal

import pytest

from tests.helpers import NO_TRAINER, compose_experiment

# The files whose fixtures train, slowest first (setup and calls in a `make test` of 2026-12-06: test_train_e2e
# about 18 minutes, test_faults 7, test_pruning and test_gpu_hf 5 each, ...). With one file per test process
# at a time (make test: pytest-xdist --dist loadfile --no-loadscope-reorder), starting them first keeps both
# processes busy to the end instead of leaving one training while the other has nothing left.
SLOWEST_FIRST = ("test_train_e2e.py", "test_faults.py", "test_pruning.py", "test_gpu_hf.py", "test_sweep_objective.py",
                 "test_tracking.py", "test_live_e2e.py", "test_axes_e2e.py", "test_holdout_e2e.py", "test_caption.py",
                 "test_bucket_fate.py", "test_score_preference.py", "test_diffusers_backend.py", "test_tinymodel.py",
                 "test_estimate.py", "test_score_models.py")


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


def pytest_collection_modifyitems(items: list) -> None:
    """SLOWEST_FIRST's files first; every other file after them, in the order collected (a stable sort
    keeps each file's tests together and in order)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a trainer test and its fixtures: the demo's tiny SD3 (models/tiny-sd3), which tests that train
    or render with demo=false use and do not build. Built once per machine; sd3exp's lock makes a second
    test process wait for it. (With the slowest files first, test_faults once ran before any test built it.)"""
    if item.get_closest_marker("trainer") is not None and not NO_TRAINER:
        _demo_model()


@functools.lru_cache(maxsize=1)
def _demo_model() -> None:
    from sd3exp.demo import ensure_demo_assets

    ensure_demo_assets(compose_experiment("demo_quick"), with_model=True)
