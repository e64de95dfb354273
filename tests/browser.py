"""Open a page in headless Chromium through the DevTools protocol (websocket-client)
and report which images loaded and what the console said."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import requests
import websocket

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--allow-file-access-from-files",
         # Chromium >= 111 rejects a DevTools websocket whose Origin it was not told about
         # ("Rejected an incoming WebSocket connection ... --remote-allow-origins").
         "--remote-allow-origins=*"]
IMAGES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]))"


def chromium() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser") or ""


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 30) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not marker.is_file() or not marker.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chromium did not start: {proc.stderr.read().decode(errors='replace')[-1500:]}")
        time.sleep(0.1)
    return int(marker.read_text().split()[0])


class Page:
    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def errors(self) -> List[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(json.dumps(p.get("args")))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out


@contextlib.contextmanager
def chromium_page(*flags: str) -> Iterator[Page]:
    """The first page of a headless Chromium with a throwaway profile. On exit the browser's whole
    process group is stopped before the profile is removed: its helpers outlive the main process for a
    moment and still write there (CI once failed removing the profile: "Directory not empty: 'Default'")."""
    profile = Path(tempfile.mkdtemp(prefix="sd3exp-test-chromium-"))
    proc = subprocess.Popen([chromium(), *FLAGS, *flags, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        port = _devtools_port(profile, proc)
        target = next(t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=10).json()
                      if t["type"] == "page")
        yield Page(target["webSocketDebuggerUrl"])
    finally:
        _stop_group(proc)
        _remove(profile)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the browser's process group, then, once the browser is gone (10 s at most), SIGKILL
    to whatever of the group is left (the storage service writes the profile's Default/)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _remove(profile: Path, tries: int = 50) -> None:
    """Remove the profile, retrying while a helper that was already exiting still writes to it."""
    for _ in range(tries - 1):
        try:
            return shutil.rmtree(profile)
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(profile)


def open_page(path: Path, evaluate: Sequence[str] = ()) -> Dict[str, object]:
    """{'images': [[src, loaded], ...], 'errors': [...], 'values': [...]} for a file opened from disk;
    `values` are the results of the `evaluate` expressions, run in order after the load."""
    with chromium_page() as page:
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", url=path.resolve().as_uri())
        page.wait_for("Page.loadEventFired")
        time.sleep(0.5)
        images = json.loads(page.call("Runtime.evaluate", expression=IMAGES_JS)["result"]["value"])
        values = [page.call("Runtime.evaluate", expression=e, returnByValue=True)["result"].get("value")
                  for e in evaluate]
        page.call("Runtime.evaluate", expression="1")
        return {"images": images, "errors": page.errors(), "values": values}
