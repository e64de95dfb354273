"""ComfyUI's responses (pure): POST /prompt rejections, /history entries, websocket events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class ImageRef:
    """An output file as /history names it."""

    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True)
class Outcome:
    """What /history says about one prompt."""

    ok: bool
    images: tuple[ImageRef, ...] = ()
    error: str = ""
    seconds: Optional[float] = None  # on the server, when its messages carry timestamps


def node_errors_text(node_errors: Mapping[str, Any]) -> str:
    """One line per node error: node id, class, message, details."""
    return "; ".join(
        f"node {node_id} ({info.get('class_type', '?')}): {err.get('message', '')}: {err.get('details', '')}"
        for node_id, info in node_errors.items()
        for err in info.get("errors", [])
    )


@dataclass(frozen=True)
class RefusedInput:
    """One input a rejected POST /prompt names (a node error with extra_info.input_name)."""

    node: str
    class_type: str
    input_name: str
    kind: str  # ComfyUI's error type, e.g. value_not_in_list
    value: Any


def refused_inputs(body: Any) -> Optional[list[RefusedInput]]:
    """Every node error of a rejected POST /prompt as the input it names; None when one names no input
    (a missing node, a broken link) or the body has no node errors."""
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    if not isinstance(node_errors, dict) or not node_errors:
        return None
    found = []
    for node_id, info in node_errors.items():
        errors = info.get("errors") if isinstance(info, dict) else None
        for err in errors if isinstance(errors, list) and errors else [{}]:
            extra = err.get("extra_info") if isinstance(err, dict) else None
            if not isinstance(extra, dict) or not extra.get("input_name"):
                return None
            found.append(RefusedInput(str(node_id), str(info.get("class_type", "?")), str(extra["input_name"]),
                                      str(err.get("type", "")), extra.get("received_value")))
    return found


def prompt_rejection(status_code: int, body: Any) -> Optional[str]:
    """None when POST /prompt queued the whole graph, else why not."""
    if not isinstance(body, dict):
        return f"ComfyUI answered POST /prompt with HTTP {status_code}: {str(body)[:300]}"
    if status_code == 200 and not body.get("node_errors"):
        return None
    error = body.get("error") or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    head = f"ComfyUI rejected the prompt (HTTP {status_code}"
    head += f", {error['type']})" if error.get("type") else ")"
    details = [error.get("message", ""), error.get("details", ""), node_errors_text(body.get("node_errors") or {})]
    return ": ".join([head] + [d for d in details if d])


def _history_error(messages: Sequence[Any]) -> str:
    for event, data in messages:
        if event == "execution_error":
            where = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
            return f"{where} failed: {data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}"
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')}"
    return "ComfyUI reported an error without details"


def render_seconds(messages: Sequence[Any]) -> Optional[float]:
    """Server time from execution_start to the event that ended the prompt (ComfyUI stamps
    each status message in ms); None when a stamp is missing."""
    stamps = {event: data.get("timestamp") for event, data in messages if isinstance(data, dict)}
    ends = [stamps.get(e) for e in ("execution_success", "execution_error", "execution_interrupted")]
    start, end = stamps.get("execution_start"), next((t for t in ends if t is not None), None)
    return None if start is None or end is None else max(0.0, (end - start) / 1000)


def parse_history(entry: Mapping[str, Any], save_node: str) -> Outcome:
    """Outcome of one /history/<id> entry; images are those of the SaveImage node."""
    status = entry.get("status") or {}
    messages = status.get("messages", [])
    seconds = render_seconds(messages)
    if status.get("status_str", "success") != "success":
        return Outcome(False, error=_history_error(messages), seconds=seconds)
    images = (entry.get("outputs") or {}).get(save_node, {}).get("images", [])
    if not images:
        return Outcome(False, error=f"finished without images from SaveImage node {save_node}", seconds=seconds)
    refs = tuple(ImageRef(i["filename"], i.get("subfolder", ""), i.get("type", "output")) for i in images)
    return Outcome(True, refs, seconds=seconds)


class EventLog:
    """/history entries rebuilt from websocket events: ComfyUI sends each status message (execution_start,
    execution_success, ... with the same timestamps) and each output node's `executed` output to the
    socket too, so a prompt the socket saw succeed needs no GET /history."""

    STATUS = ("execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted")

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, message: str | bytes) -> Optional[str]:
        """Record one message; the prompt_id of an `executing` event with node null (done, history
        written), else None."""
        if isinstance(message, bytes) or not message:
            return None  # binary preview frame, or close
        try:
            event = json.loads(message)
        except ValueError:
            return None
        kind, data = event.get("type"), event.get("data") or {}
        prompt_id = data.get("prompt_id")
        if kind == "executing" and data.get("node") is None:
            return prompt_id
        if prompt_id is None or kind not in ("executed", *self.STATUS):
            return None
        entry = self.entries.setdefault(prompt_id, {"outputs": {}, "status": {"status_str": "", "messages": []}})
        if kind == "executed":
            if isinstance(data.get("output"), dict):  # None for a cached node whose UI output is gone
                entry["outputs"][str(data.get("node"))] = data["output"]
        else:
            entry["status"]["messages"].append([kind, data])
            if kind == "execution_success":
                entry["status"]["status_str"] = "success"
        return None

    def pop(self, prompt_id: str, save_node: str) -> Optional[Outcome]:
        """The prompt's outcome when the socket saw it succeed with images from `save_node`; else None
        (ask /history: the socket joined late, a cached node sent no `executed`, or the prompt failed)."""
        entry = self.entries.pop(prompt_id, None)
        if entry is None or entry["status"].get("status_str") != "success":
            return None
        outcome = parse_history(entry, save_node)
        return outcome if outcome.ok else None


def ws_url(base: str, client_id: str) -> str:
    """ws(s)://host[/prefix]/ws?clientId=<id> for an http(s) base URL."""
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", f"clientId={client_id}", ""))

