"""The tests' headless Chromium leaves nothing behind: CI once failed removing a profile that a
helper process of an already-stopped browser still wrote to."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests import browser


def live_processes_naming(text: str) -> list:
    """Pids of processes (zombies aside) whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not browser.chromium() and os.environ.get("CI") != "true", reason="chromium is not installed")
def test_a_page_leaves_no_chromium_process_and_no_profile():
    before = set(Path(tempfile.gettempdir()).glob("sd3exp-test-chromium-*"))
    for _ in range(3):
        with browser.chromium_page() as page:
            page.call("Page.enable")
            page.call("Page.navigate", url="data:text/html,<p>hello</p>")
            page.wait_for("Page.loadEventFired")
            assert live_processes_naming("sd3exp-test-chromium-")
        assert live_processes_naming("sd3exp-test-chromium-") == []
    assert set(Path(tempfile.gettempdir()).glob("sd3exp-test-chromium-*")) == before
