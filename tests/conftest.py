"""pytest's hooks; the helpers the tests share are in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import NO_TRAINER


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_trainer"):
        item.add_marker(pytest.mark.trainer)
        if NO_TRAINER:
            item.add_marker(pytest.mark.skip(reason="the SimpleTuner trainer venv is not installed (make trainer)"))
