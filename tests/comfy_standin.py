"""A stand-in ComfyUI server for tests: real HTTP + websocket on 127.0.0.1, stdlib only.

Follows ComfyUI's own server (Comfy-Org/ComfyUI: server.py, execution.py): /prompt validation (400 with
node_errors), /object_info in list or COMBO shape, /history empty until done,
websocket events in ComfyUI's order (executing node=null only after history is
written, binary preview frames), /view with ComfyUI's path checks, /queue,
/interrupt, the output cache trap (a cached output node's `executed` names the old files, as
ComfyUI >= 2024-08 sends it; `cached_executed=False` for older servers, which sent none), and every
route under /api/ too; `requests` records each request's method and path. Hooks make
a cell fail, lose its file, get a 200 with node_errors, drop the websocket, or
run slowly.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from PIL import Image
from PIL.PngImagePlugin import PngInfo

Graph = dict[str, dict[str, Any]]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
KNOWN = OUTPUT_NODES | {
    "UNETLoader", "LoraLoaderModelOnly", "TripleCLIPLoader", "CLIPLoader", "CLIPTextEncode",
    "EmptySD3LatentImage", "KSampler", "VAELoader", "VAEDecode", "ModelSamplingSD3",
}
MODEL_INPUTS = {"UNETLoader": "unet_name", "LoraLoaderModelOnly": "lora_name"}
FOLDERS = {"UNETLoader": ("unet", "diffusion_models"), "LoraLoaderModelOnly": ("loras",)}  # under models/


def save_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]], metadata: Optional[dict] = None) -> None:
    """A safetensors file of float32 tensors (name -> (shape, little-endian bytes))."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(data for _, data in tensors.values()))


def _load_safetensors(path: Path) -> dict[str, tuple[list[int], bytes]]:
    """The tensors of a safetensors file; its metadata is dropped, as ComfyUI's loaders drop it."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header.pop("__metadata__", None)
    body = data[8 + size:]
    return {k: (v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}


def lora_patch(path: Path, strength: float) -> str:
    """What LoraLoaderModelOnly adds (comfy/weight_adapter/lora.py): strength x (alpha/rank if the file
    has `.alpha` tensors, else 1) x B·A; B·A stands for the lora tensors' digest."""
    tensors = _load_safetensors(path)
    scale = 1.0
    for key, (_, data) in tensors.items():
        if key.endswith(".alpha"):
            rank = tensors[key[:-len(".alpha")] + ".lora_A.weight"][0][0]
            scale = struct.unpack("<f", data[:4])[0] / rank
    weights = hashlib.sha1(b"".join(k.encode() + d for k, (_, d) in sorted(tensors.items()) if not k.endswith(".alpha")))
    return f"{weights.hexdigest()[:12]}x{round(strength * scale, 6):g}"


def node_value(graph: Graph, class_type: str, name: str) -> Any:
    """The input `name` of the first node of `class_type` (hooks use it to pick cells)."""
    return next((n["inputs"].get(name) for n in graph.values() if n.get("class_type") == class_type), None)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


class WsConn:
    """One server-side RFC 6455 connection: unmasked frames out, masked frames in."""

    def __init__(self, sock: socket.socket, rfile: io.BufferedIOBase) -> None:
        self.sock, self.rfile, self.lock, self.open = sock, rfile, threading.Lock(), True

    def send(self, payload: bytes, opcode: int = 1) -> None:
        n = len(payload)
        if n < 126:
            size = bytes([n])
        else:
            size = bytes([126]) + struct.pack(">H", n) if n < 65536 else bytes([127]) + struct.pack(">Q", n)
        with self.lock:
            if not self.open:
                return
            try:
                self.sock.sendall(bytes([0x80 | opcode]) + size + payload)
            except OSError:
                self.open = False

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("client went away")
        return data

    def serve(self) -> None:
        """Answer pings and close frames until the client or the server closes."""
        try:
            while self.open:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n >= 126:
                    n = struct.unpack(">H" if n == 126 else ">Q", self._read(2 if n == 126 else 8))[0]
                mask = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read(n)))
                if b0 & 0x0F == 8:
                    self.send(payload[:2], 8)
                    return
                if b0 & 0x0F == 9:
                    self.send(payload, 10)
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            self.open = False

    def drop(self) -> None:
        """Cut the TCP connection without a close frame."""
        with self.lock:
            self.open = False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Item:
    number: int
    prompt_id: str
    graph: Graph
    client_id: Optional[str]

    def row(self) -> list[Any]:
        outputs = [i for i, n in self.graph.items() if n["class_type"] in OUTPUT_NODES]
        return [self.number, self.prompt_id, self.graph, {"client_id": self.client_id}, outputs]


@dataclass
class StandIn:
    """The server. Use as a context manager; `url` is http://127.0.0.1:<port>."""

    output_dir: Path
    models_dir: Optional[Path] = None  # when set, listed and read by the loaders (models/unet, loras, ...)
    unet_names: list[str] = field(default_factory=list)
    lora_names: list[str] = field(default_factory=list)
    combo: bool = False  # /object_info in ["COMBO", {"options": [...]}] shape
    combos: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # {class_type: {input: values}}, checked
    delay_s: float = 0.01  # KSampler time per prompt
    history_lag_s: float = 0.03  # between execution_success and the history write
    answer_lag_s: float = 0.0  # between queueing a prompt and answering its POST /prompt (it may run first)
    # hooks
    error_if: Callable[[Graph], Optional[str]] = lambda g: None  # exception message -> execution_error
    lose_file_if: Callable[[Graph], bool] = lambda g: False  # listed in history, never written
    partial_if: Callable[[Graph], bool] = lambda g: False  # 200 with non-empty node_errors
    drop_ws_after: Optional[int] = None  # cut websockets once this many prompts finished
    on_done: Callable[[str], None] = lambda prompt_id: None  # after a history write
    cached_executed: bool = True  # False: no `executed` for cached output nodes (ComfyUI before 2024-08)
    # observations
    queued: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)  # model files read by loader nodes (not cached)
    frees: list[Any] = field(default_factory=list)  # POST /free bodies
    deleted: list[str] = field(default_factory=list)
    interrupts: list[Optional[str]] = field(default_factory=list)
    ready_at: dict[str, float] = field(default_factory=dict)  # prompt_id -> when its image was written
    requests: list[str] = field(default_factory=list)  # "GET /history/<id>", ... (the /api prefix kept)
    ws_drops: int = 0

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: list[Item] = []
        self.running: Optional[Item] = None
        self.history: dict[str, Any] = {}
        self.sockets: dict[str, list[WsConn]] = {}
        self.cache: dict[str, Any] = {}
        self.flags: dict[str, Any] = {}
        self.finished = 0
        self.number = 0
        self.interrupt_flag = False
        self.stopping = False

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "StandIn":
        handler = type("Handler", (_Handler,), {"standin": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()
        threading.Thread(target=self._worker, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for conns in self.sockets.values():
            for conn in conns:
                conn.drop()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------ events

    def emit(self, client_id: Optional[str], kind: str, data: dict[str, Any]) -> None:
        for conn in self.sockets.get(client_id or "", []):
            conn.send(json.dumps({"type": kind, "data": data}).encode())

    def emit_preview(self, client_id: Optional[str], png: bytes) -> None:
        for conn in self.sockets.get(client_id or "", []):
            conn.send(struct.pack(">II", 1, 2) + png, opcode=2)

    def drop_sockets(self) -> None:
        self.ws_drops += 1
        for conns in self.sockets.values():
            for conn in conns:
                conn.drop()

    # ------------------------------------------------------------ /prompt

    def submit(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
            return 400, _error("no_prompt", "No prompt provided", "No prompt provided")
        graph = body["prompt"]
        for node_id, node in graph.items():
            if node.get("class_type") not in KNOWN:
                message = f"Cannot execute because node {node.get('class_type')} does not exist."
                return 400, _error("invalid_prompt", message, f"Node ID '#{node_id}'")
        outputs = [i for i, n in graph.items() if n["class_type"] in OUTPUT_NODES]
        if not outputs:
            return 400, _error("prompt_no_outputs", "Prompt has no outputs", "")
        node_errors = self.validate(graph, outputs)
        if node_errors:
            failed = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
            return 400, {**failed, "node_errors": node_errors}
        if self.partial_if(graph):
            error = _err("value_not_in_list", "Value not in list", "image: 'x.png' not in []")
            node_errors = {"99": {"errors": [error], "dependent_outputs": ["98"], "class_type": "LoadImage"}}
        with self.cond:
            self.number += 1
            item = Item(self.number, str(body.get("prompt_id") or uuid.uuid4()), graph, body.get("client_id"))
            self.pending.append(item)
            self.queued.append(item.prompt_id)
            self.cond.notify_all()
        return 200, {"prompt_id": item.prompt_id, "number": item.number, "node_errors": node_errors}

    def names(self, class_type: str) -> list[str]:
        """The listed names, plus what models_dir holds (scanned recursively, symlinks followed)."""
        listed = self.unet_names if class_type == "UNETLoader" else self.lora_names
        found = []
        for folder in FOLDERS[class_type] if self.models_dir else ():
            root = self.models_dir / folder
            found += sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors") if p.is_file())
        return listed + [n for n in found if n not in listed]

    def validate(self, graph: Graph, outputs: list[str]) -> dict[str, Any]:
        errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            found = self._node_errors(graph, node)
            if found:
                errors[node_id] = {"errors": found, "dependent_outputs": outputs, "class_type": node["class_type"]}
        return errors

    def _node_errors(self, graph: Graph, node: dict[str, Any]) -> list[dict[str, Any]]:
        inputs, found = node["inputs"], []
        for name, value in inputs.items():
            if _is_link(value) and str(value[0]) not in graph:
                details = f"{name}: no node {value[0]}"
                found.append(_err("exception_during_validation", "Exception when validating node", details))
        name = MODEL_INPUTS.get(node["class_type"])
        listed = {name: self.names(node["class_type"])} if name else {}
        for key, values in {**listed, **self.combos.get(node["class_type"], {})}.items():
            if inputs.get(key) not in values:
                details = f"{key}: '{inputs.get(key)}' not in {values}"  # execution.py validate_inputs
                found.append(_err("value_not_in_list", "Value not in list", details, key, inputs.get(key)))
        if node["class_type"] == "KSampler" and isinstance(inputs.get("steps"), int) and inputs["steps"] < 1:
            message = f"Value {inputs['steps']} smaller than min of 1"
            found.append(_err("value_smaller_than_min", message, "steps", "steps"))
        return found

    # ------------------------------------------------------------ execution

    def _worker(self) -> None:
        """ComfyUI's prompt_worker: take the next prompt if one is queued, run it, then apply the
        /free flags (so a prompt already queued when /free arrives may still run from the cache)."""
        while True:
            with self.cond:
                while not self.pending and not self.stopping and not self.flags:
                    self.cond.wait()
                if self.stopping:
                    return
                self.running = self.pending.pop(0) if self.pending else None
                self.interrupt_flag = False
            if self.running:
                self._execute(self.running)
            with self.cond:
                if self.flags.pop("free_memory", False):
                    self.cache.clear()
                self.flags.clear()

    def _execute(self, item: Item) -> None:
        cid, pid = item.client_id, item.prompt_id
        self.emit(cid, "status", {"status": {"exec_info": {"queue_remaining": len(self.pending) + 1}}})
        messages: list[Any] = [["execution_start", {"prompt_id": pid, "timestamp": _ms()}]]
        self.emit(cid, *messages[0])
        signatures = _signatures(item.graph)
        cached = [n for n in _order(item.graph) if signatures[n] in self.cache]
        messages.append(["execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": _ms()}])
        self.emit(cid, *messages[1])
        outputs: dict[str, Any] = {}
        values: dict[str, Any] = {}  # what each node computed (a model, latents), as a digest
        failure = None
        for node_id in _order(item.graph):
            if node_id in cached:  # ComfyUI's cache: keyed by input values, so a changed file is not re-read
                output, values[node_id] = self.cache[signatures[node_id]]
                outputs.update({node_id: output} if output else {})
                if self.cached_executed and item.graph[node_id]["class_type"] in OUTPUT_NODES:
                    executed = {"node": node_id, "display_node": node_id, "output": output, "prompt_id": pid}
                    self.emit(cid, "executed", executed)  # execution.py execute(): the cached UI output
                continue
            failure = self._run_node(item, node_id, outputs, values)
            if failure:
                break
            self.cache[signatures[node_id]] = (outputs.get(node_id), values.get(node_id))
        if failure:
            messages.append(failure)
            outputs = {}
        else:
            messages.append(["execution_success", {"prompt_id": pid, "timestamp": _ms()}])
            self.emit(cid, *messages[-1])
            time.sleep(self.history_lag_s)
        self._task_done(item, outputs, messages, failure is None)

    def _input_value(self, node: dict[str, Any], name: str, values: dict[str, Any]) -> Any:
        link = node["inputs"].get(name)
        return values.get(str(link[0])) if _is_link(link) else link

    def _file(self, class_type: str, name: str) -> Optional[Path]:
        """The model file a loader reads (symlinks followed), when models_dir has it."""
        for folder in FOLDERS[class_type] if self.models_dir else ():
            path = self.models_dir / folder / name
            if path.is_file():
                self.loads.append(name)
                return path
        return None

    def _compute(self, node: dict[str, Any], values: dict[str, Any]) -> Any:
        """A digest of what the node computes: a model's tensors, a sample of a model and seed."""
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            path = self._file(kind, inputs["unet_name"])
            return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path else inputs["unet_name"]
        if kind == "LoraLoaderModelOnly":
            strength = float(inputs.get("strength_model", 1.0))
            path = self._file(kind, inputs["lora_name"])
            patch = lora_patch(path, strength) if path else f"{inputs['lora_name']}x{strength:g}"
            return f"{self._input_value(node, 'model', values)}+{patch}"
        if kind == "KSampler":
            return f"{self._input_value(node, 'model', values)}|seed={inputs.get('seed')}"
        if kind == "VAEDecode":
            return self._input_value(node, "samples", values)
        return None

    def _run_node(self, item: Item, node_id: str, outputs: dict[str, Any], values: dict[str, Any]
                  ) -> Optional[list[Any]]:
        """Run one node; the [event, data] that ended the prompt, or None."""
        cid, pid, node = item.client_id, item.prompt_id, item.graph[node_id]
        self.emit(cid, "executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
        values[node_id] = self._compute(node, values)
        if node["class_type"] == "KSampler":
            return self._sample(item, node_id)
        if node["class_type"] == "SaveImage":
            images = self._save(item, node, self._input_value(node, "images", values))
            outputs[node_id] = {"images": images}
            executed = {"node": node_id, "display_node": node_id, "output": {"images": images}, "prompt_id": pid}
            self.emit(cid, "executed", executed)
        return None

    def _sample(self, item: Item, node_id: str) -> Optional[list[Any]]:
        cid, pid = item.client_id, item.prompt_id
        base = {"prompt_id": pid, "node_id": node_id, "node_type": "KSampler", "executed": []}
        for step in range(1, 4):
            if self._sleep(self.delay_s / 3):
                stopped = {**base, "timestamp": _ms()}
                self.emit(cid, "execution_interrupted", stopped)
                return ["execution_interrupted", stopped]
            self.emit(cid, "progress", {"value": step, "max": 3, "prompt_id": pid, "node": node_id})
            self.emit_preview(cid, _png(8, (step * 60, 0, 0), {}))
        message = self.error_if(item.graph)
        if message is None:
            return None
        data = {**base, "timestamp": _ms(), "exception_message": message, "exception_type": "RuntimeError", "traceback": ["..."],
                "current_inputs": {}, "current_outputs": {}}
        self.emit(cid, "execution_error", data)
        return ["execution_error", data]

    def _sleep(self, seconds: float) -> bool:
        """Sleep; True as soon as our running prompt is interrupted."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.interrupt_flag:
                return True
            time.sleep(min(0.005, max(0.0, end - time.monotonic())))
        return self.interrupt_flag

    def _save(self, item: Item, node: dict[str, Any], pixels: Any) -> list[dict[str, str]]:
        """SaveImage: `<prefix>_<counter:05>_.png`, a `/` in the prefix makes a subfolder."""
        subfolder, _, base = str(node["inputs"]["filename_prefix"]).rpartition("/")
        folder = self.output_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        counters = [int(p.name[len(base) + 1:len(base) + 6]) for p in folder.glob(f"{base}_?????_.png")]
        name = f"{base}_{max(counters, default=0) + 1:05}_.png"
        if not self.lose_file_if(item.graph):  # the colour stands for what was sampled: model and seed
            r, g, b = hashlib.sha1(str(pixels).encode()).digest()[:3]
            (folder / name).write_bytes(_png(8, (r, g, b), {"prompt": json.dumps(item.graph)}))
        self.ready_at[item.prompt_id] = time.monotonic()
        return [{"filename": name, "subfolder": subfolder, "type": "output"}]

    def _task_done(self, item: Item, outputs: dict[str, Any], messages: list[Any], ok: bool) -> None:
        """Write history and leave the queue atomically, then tell the client (ComfyUI's order)."""
        with self.cond:
            self.history[item.prompt_id] = {
                "prompt": item.row(),
                "outputs": outputs,
                "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": messages},
                "meta": {},
            }
            self.running = None
            self.finished += 1
        self.on_done(item.prompt_id)
        if self.drop_ws_after is not None and self.finished == self.drop_ws_after:
            self.drop_sockets()
        self.emit(item.client_id, "status", {"status": {"exec_info": {"queue_remaining": len(self.pending)}}})
        self.emit(item.client_id, "executing", {"node": None, "prompt_id": item.prompt_id})

    # ------------------------------------------------------------ other routes

    def object_info(self, class_type: str) -> dict[str, Any]:
        name = MODEL_INPUTS.get(class_type)
        combos = self.combos.get(class_type, {})
        if name is None and not combos:
            return {}
        shape = (lambda values: ["COMBO", {"options": values}]) if self.combo else (lambda values: [values])
        required = {key: shape(values) for key, values in combos.items()}
        if class_type == "UNETLoader":
            required |= {"weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]]}
        elif class_type == "LoraLoaderModelOnly":
            required |= {"model": ["MODEL"], "strength_model": ["FLOAT", {"default": 1.0}]}
        if name is not None:
            required[name] = shape(self.names(class_type))
        info = {"input": {"required": required}, "output_node": class_type in OUTPUT_NODES}
        return {class_type: {**info, "name": class_type}}

    def queue_state(self) -> dict[str, Any]:
        with self.cond:
            running = [self.running.row()] if self.running else []
            return {"queue_running": running, "queue_pending": [i.row() for i in self.pending]}

    def change_queue(self, body: dict[str, Any]) -> None:
        with self.cond:
            ids = set(body.get("delete", []))
            self.deleted += [i.prompt_id for i in self.pending if i.prompt_id in ids]
            self.pending = [] if body.get("clear") else [i for i in self.pending if i.prompt_id not in ids]

    def free(self, body: dict[str, Any]) -> None:
        """POST /free sets flags; the worker applies them (free_memory resets the node cache)."""
        self.frees.append(body)
        with self.cond:
            self.flags.update({k: body[k] for k in ("unload_models", "free_memory") if k in body})
            self.cond.notify_all()

    def interrupt(self, body: dict[str, Any]) -> None:
        target = body.get("prompt_id")
        self.interrupts.append(target)
        with self.cond:
            if self.running and target in (None, self.running.prompt_id):
                self.interrupt_flag = True

    def view(self, query: dict[str, str]) -> tuple[int, bytes]:
        filename, subfolder = query.get("filename", ""), query.get("subfolder", "")
        if not filename or filename.startswith("/") or ".." in filename:
            return 400, b""
        root = os.path.abspath(self.output_dir)
        folder = os.path.abspath(os.path.join(root, subfolder))
        if os.path.commonpath((folder, root)) != root:
            return 403, b""
        path = Path(folder) / filename
        return (200, path.read_bytes()) if path.is_file() else (404, b"")


def _err(kind: str, message: str, details: str, input_name: str = "", received: Any = None) -> dict[str, Any]:
    extra = {"input_name": input_name, "received_value": received} if input_name else {}
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def _ms() -> int:
    return int(time.time() * 1000)


def _png(size: int, color: tuple[int, int, int], text: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _order(graph: Graph) -> list[str]:
    """Node ids, each after the nodes it reads from."""
    seen: list[str] = []

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        for value in graph[node_id]["inputs"].values():
            if _is_link(value):
                visit(str(value[0]))
        seen.append(node_id)

    for node_id in sorted(graph):
        visit(node_id)
    return seen


def _signatures(graph: Graph) -> dict[str, str]:
    """Cache keys: class_type + inputs, links replaced by the upstream key (ComfyUI's cache)."""
    keys: dict[str, str] = {}
    for node_id in _order(graph):
        node = graph[node_id]
        inputs = {k: keys[str(v[0])] + f"#{v[1]}" if _is_link(v) else v for k, v in sorted(node["inputs"].items())}
        keys[node_id] = hashlib.sha1(json.dumps([node["class_type"], inputs], sort_keys=True).encode()).hexdigest()
    return keys


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: StandIn

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body are two writes

    def log_message(self, *args: Any) -> None:
        pass

    def _route(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        self.standin.requests.append(f"{self.command} {parts.path}")
        path = parts.path[4:] if parts.path.startswith("/api/") else parts.path
        return path, {k: v[0] for k, v in parse_qs(parts.query).items()}

    def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path, query = self._route()
        s = self.standin
        if path == "/ws":
            return self._websocket(query.get("clientId") or uuid.uuid4().hex)
        if path == "/system_stats":
            return self._reply(200, {"system": {"comfyui_version": "standin", "python_version": sys.version},
                                     "devices": []})
        if path.startswith("/object_info/"):
            return self._reply(200, s.object_info(path.split("/", 2)[2]))
        if path.startswith("/history/"):
            prompt_id = path.split("/", 2)[2]
            with s.cond:
                entry = s.history.get(prompt_id)
            return self._reply(200, {prompt_id: entry} if entry else {})
        if path == "/queue":
            return self._reply(200, s.queue_state())
        if path == "/view":
            status, data = s.view(query)
            return self._reply(status, data, "image/png")
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        path, _ = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._reply(400, {"error": "invalid json"})
        s = self.standin
        if path == "/prompt":
            answer = s.submit(body)
            time.sleep(s.answer_lag_s)
            return self._reply(*answer)
        if path == "/queue":
            s.change_queue(body)
        elif path == "/free":
            s.free(body)
        elif path == "/interrupt":
            s.interrupt(body)
        else:
            return self._reply(404, {"error": "not found"})
        self._reply(200, {})

    def _websocket(self, client_id: str) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        conn, s = WsConn(self.connection, self.rfile), self.standin
        with conn.lock:  # registered before the client can queue anything; events wait for the 101
            s.sockets.setdefault(client_id, []).append(conn)
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
        status = {"status": {"exec_info": {"queue_remaining": len(s.pending)}}, "sid": client_id}
        conn.send(json.dumps({"type": "status", "data": status}).encode())
        conn.serve()
        self.close_connection = True
