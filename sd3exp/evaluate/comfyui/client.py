"""One ComfyUI server over HTTP (requests, connection retries) and its event websocket."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import requests
import websocket

from sd3exp.errors import EvalError
from sd3exp.evaluate.comfyui.names import listed_names
from sd3exp.evaluate.comfyui.protocol import (
    EventLog,
    ImageRef,
    Outcome,
    RefusedInput,
    prompt_rejection,
    refused_inputs,
    ws_url,
)
from sd3exp.evaluate.comfyui.workflow import LOADERS, Graph

log = logging.getLogger(__name__)
SAFETY_POLL_S = 10.0  # poll /queue this often even while the websocket is up


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _session(base: str) -> requests.Session:
    """A session with the environment's proxies, CA bundle and .netrc login for `base` read once,
    not on every request (requests re-reads them per request: half a millisecond each here)."""
    session = requests.Session()
    settings = session.merge_environment_settings(base, {}, None, None, None)
    session.auth = requests.utils.get_netrc_auth(base)
    session.proxies, session.verify, session.cert = settings["proxies"], settings["verify"], settings["cert"]
    session.trust_env = False
    return session


class Submitted(NamedTuple):
    """POST /prompt's answer: the prompt_id; why the prompt was rejected, and the inputs that says, if it was."""

    prompt_id: Optional[str]
    problem: Optional[str]
    refused: Optional[list[RefusedInput]] = None


class ComfyClient:
    """One ComfyUI server (base URL with or without /api), one client_id, connection retries."""

    def __init__(self, url: str, retries: int = 4, backoff_s: float = 0.5, request_timeout_s: float = 60.0) -> None:
        self.base = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.retries, self.backoff_s, self.request_timeout_s = retries, backoff_s, request_timeout_s
        self.session = _session(self.base)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An HTTP request, retried with exponential backoff while the server cannot be reached."""
        attempt = 0
        while True:
            try:
                return self.session.request(method, self.base + path, timeout=self.request_timeout_s, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.retries:
                    raise EvalError(
                        f"cannot reach ComfyUI at {self.base} ({method} {path}, {attempt + 1} tries): {exc}. "
                        "Is it running with --listen, and is eval.url right?"
                    ) from exc
                time.sleep(self.backoff_s * 2**attempt)
                attempt += 1

    def get_json(self, path: str, **params: Any) -> Any:
        """GET returning JSON; EvalError for any status but 200."""
        response = self.request("GET", path, params=params or None)
        if response.status_code != 200:
            raise EvalError(f"ComfyUI GET {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def model_names(self, kind: str) -> list[str]:
        """Names the loader node for `kind` accepts."""
        class_type, input_name, _ = LOADERS[kind]
        return listed_names(self.get_json(f"/object_info/{class_type}"), class_type, input_name)

    def queue_prompt(self, graph: Graph) -> Submitted:
        """The prompt_id when queued; with why not (and the inputs it names) when rejected, in part or whole."""
        response = self.request("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        body = _body(response)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        problem = prompt_rejection(response.status_code, body)
        return Submitted(prompt_id, problem, refused_inputs(body) if problem else None)

    def history(self, prompt_id: str) -> Optional[Mapping[str, Any]]:
        """The /history entry, or None while not finished (or unknown)."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def queue(self) -> tuple[set[str], set[str]]:
        """(running, pending) prompt ids."""
        body = self.get_json("/queue")
        return {i[1] for i in body["queue_running"]}, {i[1] for i in body["queue_pending"]}

    def view(self, image: ImageRef) -> bytes:
        """The bytes of an output file; EvalError naming it when /view fails."""
        params = {"filename": image.filename, "subfolder": image.subfolder, "type": image.type}
        response = self.request("GET", "/view", params=params)
        if response.status_code != 200:
            where = f"{image.subfolder}/{image.filename}".lstrip("/")
            raise EvalError(f"/view {where}: HTTP {response.status_code} (named by ComfyUI but not served)")
        return response.content

    def cancel(self, prompt_ids: Sequence[str]) -> None:
        """Delete our pending prompts, then interrupt any of ours running (in that order: no race)."""
        self.request("POST", "/queue", json={"delete": list(prompt_ids)})
        running, _ = self.queue()
        for prompt_id in running & set(prompt_ids):
            self.request("POST", "/interrupt", json={"prompt_id": prompt_id})

    def free(self, grace_s: float = 0.5) -> None:
        """Unload ComfyUI's models and reset its node cache (POST /free). The server applies it after
        the prompt it is running, before taking the next; `grace_s` lets an idle worker wake first."""
        response = self.request("POST", "/free", json={"unload_models": True, "free_memory": True})
        if response.status_code != 200:
            raise EvalError(f"ComfyUI POST /free: HTTP {response.status_code}: {response.text[:300]}")
        time.sleep(grace_s)

    def open_socket(self) -> Optional[websocket.WebSocket]:
        """The event websocket for our client_id, or None (then we poll)."""
        try:
            # recv() decodes text frames strictly anyway (a bad one raises ValueError, handled as a drop):
            # websocket-client's pure-Python UTF-8 check before it cost more than the rest of a recv
            return websocket.create_connection(ws_url(self.base, self.client_id), timeout=self.request_timeout_s,
                                               skip_utf8_validation=True)
        except (OSError, websocket.WebSocketException) as exc:
            log.warning("ComfyUI websocket unavailable (%s); polling /queue and /history instead", exc)
            return None


class Watcher:
    """Tells which of our prompts have settled: from websocket events, else by polling /queue."""

    def __init__(self, client: ComfyClient, poll_s: float) -> None:
        self.client, self.poll_s = client, poll_s
        self.socket = client.open_socket()
        self.timeout_s: Optional[float] = None  # the socket's, as last set
        self.last_poll = time.monotonic()
        self.events = EventLog()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def settled(self, pending: Sequence[str], wait_s: float) -> list[str]:
        """Prompt ids among `pending` that finished (history written) or left the queue."""
        if self.socket is not None:
            done = self._receive(self.socket, wait_s)
            if done is not None and done in pending:
                return [done]
            if time.monotonic() - self.last_poll < SAFETY_POLL_S:
                return []
        else:
            time.sleep(max(0.0, min(self.poll_s, wait_s)))
        return self._poll(pending)

    def _receive(self, socket: websocket.WebSocket, wait_s: float) -> Optional[str]:
        try:
            timeout_s = max(0.01, wait_s)
            if timeout_s != self.timeout_s:  # almost always the same 1 s: each set costs two fcntl calls
                socket.settimeout(timeout_s)
                self.timeout_s = timeout_s
            return self.events.add(socket.recv())
        except websocket.WebSocketTimeoutException:
            return None
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            log.warning("ComfyUI websocket dropped (%s); polling /queue and /history", exc)
            self.close()
            return None

    def outcome(self, prompt_id: str, save_node: str) -> Optional[Outcome]:
        """What the websocket said about a settled prompt, when it named `save_node`'s files; else None."""
        return self.events.pop(prompt_id, save_node)

    def _poll(self, pending: Sequence[str]) -> list[str]:
        """ComfyUI writes history and leaves the queue atomically: not queued = settled."""
        self.last_poll = time.monotonic()
        running, queued = self.client.queue()
        return [p for p in pending if p not in running and p not in queued]

