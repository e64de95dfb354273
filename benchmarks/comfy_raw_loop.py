"""The least a ComfyUI sweep can do, as a baseline: POST every graph to /prompt, read the websocket
until each prompt's `executing` node=null, fetch the files its `executed` events named with
GET /view and write them to a folder. No retries, no error handling, no /history."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Sequence

import requests
import websocket


def raw_loop(url: str, graphs: Sequence[dict[str, Any]], out_dir: Path) -> int:
    """Render `graphs` on the ComfyUI at `url` into `out_dir`; the number of files written."""
    client_id = uuid.uuid4().hex
    socket = websocket.create_connection(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}",
                                         skip_utf8_validation=True)  # as sd3exp's client: recv() decodes anyway
    session = requests.Session()
    session.trust_env = False  # no proxy or .netrc look-ups per request
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = {session.post(f"{url}/prompt", json={"prompt": g, "client_id": client_id}).json()["prompt_id"]
               for g in graphs}
    named: dict[str, list[dict[str, str]]] = {}
    written = 0
    while pending:
        message = socket.recv()
        if isinstance(message, bytes):
            continue  # a preview
        event = json.loads(message)
        data = event["data"]
        if event["type"] == "executed":
            named.setdefault(data["prompt_id"], []).extend(data["output"]["images"])
        elif event["type"] == "executing" and data["node"] is None and data["prompt_id"] in pending:
            pending.remove(data["prompt_id"])
            for image in named.pop(data["prompt_id"], []):
                (out_dir / image["filename"]).write_bytes(session.get(f"{url}/view", params=image).content)
                written += 1
    socket.close()
    return written
