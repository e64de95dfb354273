"""A stand-in OpenAI-compatible vision server for tests: real HTTP on 127.0.0.1, stdlib + Pillow.

GET /v1/models lists the served models; POST /v1/chat/completions checks the
request the way vLLM does (a model it serves, a user message with an image_url
data URL whose base64 decodes to an image Pillow can open, at most MAX_SIDE pixels a
side: 400 otherwise) and
answers a caption built from the image's sha256. Per image (by the sha256 of its
bytes) a behaviour can be set: "429-once" (a 429 with Retry-After, then success),
"500" (always), "slow" (sleeps past the client's timeout), "malformed" (200 with a
body that is not JSON), "empty" (200 with an empty caption). `delay_s` delays every
answer (the benchmark). Every request is recorded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional

from PIL import Image

MAX_SIDE = 3000  # larger images are refused with a 400, as servers with an image-size limit do


@dataclass
class Received:
    sha256: str
    prompt: str
    system: str
    model: str


@dataclass
class State:
    models: List[str] = field(default_factory=lambda: ["joycaption"])
    behaviours: Dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    slow_s: float = 3.0
    caption: str = "This image shows a shape ({short}), plain background"
    api_key: Optional[str] = None  # when set, every request needs "Authorization: Bearer <key>"
    requests: List[Received] = field(default_factory=list)
    answered_429: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _image_part(body: dict) -> Optional[str]:
    for message in body.get("messages", []):
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image_url":
                    return part["image_url"]["url"]
    return None


def _prompt(body: dict, role: str) -> str:
    for message in body.get("messages", []):
        if message.get("role") == role:
            content = message["content"]
            return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    return ""


class Handler(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def _json(self, status: int, data: dict, **kw) -> None:
        self._send(status, json.dumps(data).encode(), **kw)

    def _authorized(self) -> bool:
        if self.state.api_key and self.headers.get("Authorization") != f"Bearer {self.state.api_key}":
            self._json(401, {"error": {"message": "Invalid API key", "code": 401}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.state.models]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        body = json.loads(data)
        st = self.state
        if body.get("model") not in st.models:
            return self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        url = _image_part(body) or ""
        head, _, b64 = url.partition(";base64,")
        try:
            raw = base64.b64decode(b64, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                if max(im.size) > MAX_SIDE:
                    raise ValueError(f"{im.size[0]}x{im.size[1]} exceeds {MAX_SIDE} pixels a side")
        except ValueError as e:
            return self._json(400, {"error": {"message": f"Image too large: {e}", "code": 400}})
        except Exception as e:
            return self._json(400, {"error": {"message": f"Invalid image: {type(e).__name__}: {e}",
                                              "type": "BadRequestError", "code": 400}})
        sha = hashlib.sha256(raw).hexdigest()
        with st.lock:
            st.requests.append(Received(sha, _prompt(body, "user"), _prompt(body, "system"), body["model"]))
            behaviour = st.behaviours.get(sha)
            first_429 = behaviour == "429-once" and sha not in st.answered_429
            if first_429:
                st.answered_429.add(sha)
        time.sleep(st.delay_s)
        if first_429:
            return self._json(429, {"error": {"message": "Too many requests"}}, headers={"Retry-After": "0"})
        if behaviour == "500":
            return self._json(500, {"error": {"message": "CUDA out of memory (stand-in)"}})
        if behaviour == "slow":
            time.sleep(st.slow_s)
        if behaviour == "malformed":
            return self._send(200, b"<html>502 Bad Gateway</html>", ctype="text/html")
        text = "" if behaviour == "empty" else st.caption.format(short=sha[:8])
        self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112}})


@contextlib.contextmanager
def serve(state: Optional[State] = None) -> Iterator[tuple]:
    """(base URL ending in /v1, state) of a server running in a thread until the block ends."""
    state = state or State()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
