"""Open a page in headless Chromium through the DevTools protocol (websocket-client)
and report which images loaded and what the console said."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

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


def open_page(path: Path, evaluate: Sequence[str] = ()) -> Dict[str, object]:
    """{'images': [[src, loaded], ...], 'errors': [...], 'values': [...]} for a file opened from disk;
    `values` are the results of the `evaluate` expressions, run in order after the load."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = _devtools_port(Path(profile), proc)
            target = next(t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=10).json()
                          if t["type"] == "page")
            page = Page(target["webSocketDebuggerUrl"])
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
        finally:
            proc.terminate()
            proc.wait(10)
