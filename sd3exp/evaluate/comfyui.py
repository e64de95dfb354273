"""Render every checkpoint x prompt x seed through ComfyUI's HTTP + websocket API.

Pure core: graph patching (`find_nodes`, `patch_graph`), cell ordering
(`plan_cells`), model-name matching, /prompt and /history parsing. I/O:
`ComfyClient` (requests + websocket-client, retries) and `run_sweep`.
Images come back through /view, named exactly as /history lists them; a
unique filename_prefix per sweep keeps ComfyUI's cache from returning old files.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import shlex
import signal
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Collection, Literal, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
import websocket
from tqdm import tqdm

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import BASE_LABEL, Checkpoint

Graph = dict[str, dict[str, Any]]
log = logging.getLogger(__name__)
# kind -> (loader class_type, model input, eval.nodes key)
LOADERS = {"full": ("UNETLoader", "unet_name", "unet"), "lora": ("LoraLoaderModelOnly", "lora_name", "lora")}
LOADERS["base"] = LOADERS["full"]  # the base model: the workflow's own unet_name
SAFETY_POLL_S = 10.0  # poll /queue this often even while the websocket is up


# ---------------------------------------------------------------- workflow (pure)


def load_workflow(path: Path | str) -> Graph:
    """Read an API-format workflow ("Save (API Format)" in ComfyUI)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read workflow {path}: {exc}") from exc
    return check_api_format(data, str(path))


def check_api_format(data: Any, source: str) -> Graph:
    """The graph itself, or EvalError naming the problem (UI format, not a graph)."""
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise EvalError(f"{source} is a UI-format workflow; export it with ComfyUI's 'Save (API Format)'")
    nodes_ok = isinstance(data, dict) and data and all(
        isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in data.values()
    )
    if not nodes_ok:
        raise EvalError(f"{source} is not an API-format workflow (node id -> {{class_type, inputs}})")
    return data


@dataclass(frozen=True)
class NodeIds:
    """The nodes a sweep patches."""

    loader: str
    positive: str
    sampler: str
    save: str
    negative: Optional[str] = None
    latent: Optional[str] = None


def _override(graph: Graph, overrides: Mapping[str, str], role: str) -> Optional[str]:
    """An explicit node id from eval.nodes, checked to exist."""
    node = overrides.get(role)
    if node is not None and str(node) not in graph:
        raise EvalError(f"eval.nodes.{role}={node!r}: no such node; the workflow has {sorted(graph)}")
    return None if node is None else str(node)


def _only(graph: Graph, class_type: str, role: str, overrides: Mapping[str, str]) -> str:
    """The override, else the single node of that class_type."""
    explicit = _override(graph, overrides, role)
    if explicit:
        return explicit
    ids = sorted(i for i, n in graph.items() if n["class_type"] == class_type)
    if not ids:
        raise EvalError(f"the workflow has no {class_type} node; add one to it (for a LoRA run use "
                        "conf/workflows/sd3_lora_api.json)")
    if len(ids) > 1:
        raise EvalError(f"the workflow has {len(ids)} {class_type} nodes {ids}. Fix: name the one to use, e.g. "
                        f"{node_override(role, ids[0])}")
    return ids[0]


def node_override(role: str, node_id: str) -> str:
    """The command-line override that picks a node (`++` adds the key or replaces it)."""
    return shlex.quote(f"++eval.nodes.{role}={node_id}")


def _linked(graph: Graph, sampler: str, name: str, class_type: str, overrides: Mapping[str, str]) -> Optional[str]:
    """The override, else the node wired to the sampler's input `name` if it has that class_type."""
    explicit = _override(graph, overrides, name)
    if explicit:
        return explicit
    link = graph[sampler]["inputs"].get(name)
    if not (isinstance(link, list) and link and str(link[0]) in graph):
        return None
    node = str(link[0])
    return node if graph[node]["class_type"] == class_type else None


def find_nodes(graph: Graph, kind: str, overrides: Optional[Mapping[str, str]] = None) -> NodeIds:
    """Locate loader, prompts, sampler, latent and SaveImage by class_type and wiring.

    `overrides` (eval.nodes) maps unet | lora | positive | negative | sampler |
    save | latent to node ids. Positive = the CLIPTextEncode wired to KSampler's
    `positive` input.
    """
    class_type, _, role = LOADERS[kind]
    overrides = overrides or {}
    sampler = _only(graph, "KSampler", "sampler", overrides)
    positive = _linked(graph, sampler, "positive", "CLIPTextEncode", overrides)
    if positive is None:
        texts = sorted(i for i, n in graph.items() if n["class_type"] == "CLIPTextEncode")
        fix = f"Fix: name the prompt node, e.g. {node_override('positive', texts[0])}" if texts else \
            "the workflow has no CLIPTextEncode node to put the prompt in"
        raise EvalError(f"KSampler {sampler}'s positive input is not a CLIPTextEncode node. {fix}")
    return NodeIds(
        loader=_only(graph, class_type, role, overrides),
        positive=positive,
        sampler=sampler,
        save=_only(graph, "SaveImage", "save", overrides),
        negative=_linked(graph, sampler, "negative", "CLIPTextEncode", overrides),
        latent=_linked(graph, sampler, "latent_image", "EmptySD3LatentImage", overrides),
    )


def without_node(graph: Graph, node_id: str, through: str) -> Graph:
    """A copy of the graph without `node_id`: whatever used its output takes its `through` input."""
    source = graph[node_id]["inputs"][through]
    out = {k: copy.deepcopy(v) for k, v in graph.items() if k != node_id}
    for node in out.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value and str(value[0]) == node_id:
                node["inputs"][key] = copy.deepcopy(source)
    return out


def base_workflow(graph: Graph, overrides: Mapping[str, str]) -> Graph:
    """The workflow rendering its own base model: a LoRA loader, if it has one, is bypassed."""
    class_type, _, role = LOADERS["lora"]
    if role not in overrides and all(n["class_type"] != class_type for n in graph.values()):
        return copy.deepcopy(graph)
    return without_node(graph, _only(graph, class_type, role, overrides), "model")


@dataclass(frozen=True)
class Sampling:
    """Values set on every cell; None keeps the workflow's own."""

    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None


@dataclass(frozen=True)
class CellSpec:
    """One render: a checkpoint, a prompt, a seed."""

    checkpoint: Checkpoint
    prompt_index: int
    prompt: str
    seed: int


def plan_cells(checkpoints: Sequence[Checkpoint], prompts: Sequence[str], seeds: Sequence[int]) -> list[CellSpec]:
    """All cells, checkpoint-major, then prompt, then seed."""
    return [CellSpec(c, i, p, s) for c in checkpoints for i, p in enumerate(prompts) for s in seeds]


def new_sweep_id() -> str:
    """A timestamped id that no earlier sweep used."""
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def filename_prefix(sweep_id: str, cell: CellSpec) -> str:
    """SaveImage prefix, unique per sweep and cell (defeats ComfyUI's output cache)."""
    return f"sd3exp/{sweep_id}/{cell.checkpoint.label}_p{cell.prompt_index}_s{cell.seed}"


def patch_graph(
    graph: Graph, nodes: NodeIds, cell: CellSpec, model_name: str, prefix: str, sampling: Sampling = Sampling(),
    strength: Optional[float] = None,
) -> Graph:
    """A copy of the graph set up for one cell; `strength` is a LoRA loader's strength_model."""
    edits = [
        ("loader", nodes.loader, LOADERS[cell.checkpoint.kind][1], model_name),
        ("loader", nodes.loader, "strength_model", strength),
        ("positive", nodes.positive, "text", cell.prompt),
        ("sampler", nodes.sampler, "seed", cell.seed),
        ("save", nodes.save, "filename_prefix", prefix),
        ("negative", nodes.negative, "text", sampling.negative_prompt),
        ("sampler", nodes.sampler, "steps", sampling.steps),
        ("sampler", nodes.sampler, "cfg", sampling.cfg),
        ("latent", nodes.latent, "width", sampling.width),
        ("latent", nodes.latent, "height", sampling.height),
    ]
    out = copy.deepcopy(graph)
    for role, node, key, value in edits:
        if value is None:
            continue
        if node is None:
            kinds = {"negative": "CLIPTextEncode", "latent": "EmptySD3LatentImage"}
            ids = sorted(i for i, n in graph.items() if n["class_type"] == kinds.get(role))
            fix = f"Fix: name it, e.g. {node_override(role, ids[0])}" if ids else \
                f"the workflow has no {kinds.get(role, role)} node for it"
            raise EvalError(f"cannot set {key}={value!r}: no {role} node is wired to the KSampler. {fix}")
        out[node]["inputs"][key] = value
    return out


# ---------------------------------------------------------------- model names (pure)


def listed_names(object_info: Mapping[str, Any], class_type: str, input_name: str) -> list[str]:
    """Names from /object_info/<class_type>: list shape or ["COMBO", {"options": [...]}]."""
    try:
        spec = object_info[class_type]["input"]["required"][input_name]
    except (KeyError, TypeError) as exc:
        raise EvalError(f"ComfyUI has no {class_type} node with input {input_name}: too old, or node missing") from exc
    if isinstance(spec[0], list):
        return [str(n) for n in spec[0]]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return [str(n) for n in spec[1].get("options", [])]
    raise EvalError(f"unexpected /object_info/{class_type} shape for {input_name}: {str(spec)[:200]}")


def _norm(name: str) -> str:
    return name.replace("\\", "/")


def closest(name: str, available: Sequence[str]) -> list[str]:
    """Available names, most similar to `name` first."""
    target = _norm(name)
    return sorted(available, key=lambda n: (-difflib.SequenceMatcher(None, target, _norm(n)).ratio(), n))


def match_names(expected: Mapping[str, str], available: Sequence[str], class_type: str) -> dict[str, str]:
    """label -> the server's spelling of its model name; EvalError listing what ComfyUI has."""
    by_norm = {_norm(n): n for n in available}
    missing = {label: name for label, name in expected.items() if _norm(name) not in by_norm}
    if missing:
        lines = [f"  {name!r} ({label}); closest: {closest(name, available)[:3]}" for label, name in missing.items()]
        shown = closest(next(iter(missing.values())), available)
        raise EvalError(
            f"ComfyUI's {class_type} cannot load {len(missing)} model(s):\n" + "\n".join(lines)
            + f"\nComfyUI lists {len(available)} name(s), closest first: {shown[:20]}"
            + ("" if len(shown) <= 20 else f" ... and {len(shown) - 20} more")
            + "\nFix: link the checkpoints into ComfyUI's models folder (eval.models_dir) or add the run "
            "folder with --extra-model-paths-config (eval.link_mode=extra_paths)."
        )
    return {label: by_norm[_norm(name)] for label, name in expected.items()}


# ---------------------------------------------------------------- responses (pure)


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


def finished_prompt(message: str | bytes) -> Optional[str]:
    """prompt_id of an `executing` event with node null (done, history written); else None."""
    if isinstance(message, bytes) or not message:
        return None  # binary preview frame, or close
    try:
        event = json.loads(message)
    except ValueError:
        return None
    data = event.get("data") or {}
    return data.get("prompt_id") if event.get("type") == "executing" and data.get("node") is None else None


# ---------------------------------------------------------------- HTTP + websocket


def ws_url(base: str, client_id: str) -> str:
    """ws(s)://host[/prefix]/ws?clientId=<id> for an http(s) base URL."""
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", f"clientId={client_id}", ""))


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class ComfyClient:
    """One ComfyUI server (base URL with or without /api), one client_id, connection retries."""

    def __init__(self, url: str, retries: int = 4, backoff_s: float = 0.5, request_timeout_s: float = 60.0) -> None:
        self.base = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.retries, self.backoff_s, self.request_timeout_s = retries, backoff_s, request_timeout_s
        self.session = requests.Session()

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

    def queue_prompt(self, graph: Graph) -> tuple[Optional[str], Optional[str]]:
        """(prompt_id, None) when queued; (id or None, why) when rejected, in part or whole."""
        response = self.request("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        body = _body(response)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        return prompt_id, prompt_rejection(response.status_code, body)

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
            raise EvalError(f"/view {where}: HTTP {response.status_code} (listed in /history but not served)")
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
            return websocket.create_connection(ws_url(self.base, self.client_id), timeout=self.request_timeout_s)
        except (OSError, websocket.WebSocketException) as exc:
            log.warning("ComfyUI websocket unavailable (%s); polling /queue and /history instead", exc)
            return None


class Watcher:
    """Tells which of our prompts have settled: from websocket events, else by polling /queue."""

    def __init__(self, client: ComfyClient, poll_s: float) -> None:
        self.client, self.poll_s = client, poll_s
        self.socket = client.open_socket()
        self.last_poll = time.monotonic()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def settled(self, pending: Sequence[str], wait_s: float) -> list[str]:
        """Prompt ids among `pending` that finished (history written) or left the queue."""
        if self.socket is not None:
            done = self._receive(wait_s)
            if done in pending:
                return [done]
            if time.monotonic() - self.last_poll < SAFETY_POLL_S:
                return []
        else:
            time.sleep(max(0.0, min(self.poll_s, wait_s)))
        return self._poll(pending)

    def _receive(self, wait_s: float) -> Optional[str]:
        try:
            self.socket.settimeout(max(0.01, wait_s))
            return finished_prompt(self.socket.recv())
        except websocket.WebSocketTimeoutException:
            return None
        except (OSError, websocket.WebSocketException) as exc:
            log.warning("ComfyUI websocket dropped (%s); polling /queue and /history", exc)
            self.close()
            return None

    def _poll(self, pending: Sequence[str]) -> list[str]:
        """ComfyUI writes history and leaves the queue atomically: not queued = settled."""
        self.last_poll = time.monotonic()
        running, queued = self.client.queue()
        return [p for p in pending if p not in running and p not in queued]


# ---------------------------------------------------------------- the sweep


@dataclass
class Cell:
    """The result of one render."""

    label: str
    step: Optional[int]
    prompt_index: int
    prompt: str
    seed: int
    status: Literal["ok", "error"] = "error"
    images: list[bytes] = field(default_factory=list)  # when not saved to disk
    paths: list[Path] = field(default_factory=list)  # when saved to save_dir
    files: list[str] = field(default_factory=list)  # server-side names, subfolder/filename
    error: str = ""
    seconds: float = 0.0
    prompt_id: Optional[str] = None
    lora_scale: Optional[float] = None  # a LoRA checkpoint's alpha/rank it was rendered at
    scores: dict[str, float] = field(default_factory=dict)  # measure -> value (sd3exp/evaluate/score.py)
    memorised: Optional[bool] = None  # a near-copy of one training image; None: not scored
    scored_with: str = ""  # digest of what the scores depend on besides the image; "" = not scored


class Stopped(KeyboardInterrupt):
    """A signal other than Ctrl-C (SIGTERM) that stops a sweep the way Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep: the cells finished so far, our queued prompts cancelled."""

    def __init__(self, cells: Sequence["Cell"], signum: int) -> None:
        super().__init__(f"{len(cells)} cell(s) finished")
        self.cells, self.signum = list(cells), signum

    @classmethod
    def during(cls, exc: KeyboardInterrupt, cells: Sequence["Cell"]) -> "SweepInterrupted":
        return cls(cells, getattr(exc, "signum", signal.SIGINT))


def _cell(spec: CellSpec, **fields: Any) -> Cell:
    c = spec.checkpoint
    return Cell(c.label, c.step, spec.prompt_index, spec.prompt, spec.seed, **fields)


@dataclass(frozen=True)
class SweepSpec:
    """What to render: checkpoints x prompts x seeds through one workflow."""

    workflow: Graph
    checkpoints: Sequence[Checkpoint]
    model_names: Mapping[str, str]  # checkpoint label -> name ComfyUI lists (links.comfy_name)
    prompts: Sequence[str]
    seeds: Sequence[int] = (0,)
    sampling: Sampling = Sampling()
    nodes: Mapping[str, str] = field(default_factory=dict)  # eval.nodes overrides
    sweep_id: str = field(default_factory=new_sweep_id)
    include_base: bool = False  # a first column from the workflow's own model (LoRA loader bypassed)
    skip: Collection[tuple[str, int, int]] = ()  # (label, prompt index, seed) of cells not to render
    strengths: Mapping[str, float] = field(default_factory=dict)  # LoRA label -> strength_model (lora_scale)


def resolve_names(
    client: ComfyClient, checkpoints: Sequence[Checkpoint], expected: Mapping[str, str]
) -> dict[str, str]:
    """label -> server spelling, per loader kind; EvalError before anything is queued."""
    resolved: dict[str, str] = {}
    for kind in sorted({c.kind for c in checkpoints}):
        wanted = {c.label: expected[c.label] for c in checkpoints if c.kind == kind}
        resolved |= match_names(wanted, client.model_names(kind), LOADERS[kind][0])
    return resolved


class _Sweep:
    """State of one running sweep: queued prompts, finished cells, progress."""

    bar: tqdm  # set by run_sweep once the names are known to be loadable

    def __init__(self, client: ComfyClient, spec: SweepSpec, save_dir: Optional[Path]) -> None:
        self.client, self.spec, self.save_dir = client, spec, save_dir
        self.nodes = {k: find_nodes(spec.workflow, k, spec.nodes) for k in {c.kind for c in spec.checkpoints}}
        self.graphs = {k: spec.workflow for k in self.nodes}
        checkpoints = list(spec.checkpoints)
        if spec.include_base:
            self.graphs["base"] = base_workflow(spec.workflow, spec.nodes)
            self.nodes["base"] = find_nodes(self.graphs["base"], "base", spec.nodes)
            checkpoints.insert(0, Checkpoint(None, BASE_LABEL, "base", Path()))
        skip = set(spec.skip)
        self.cells = [c for c in plan_cells(checkpoints, spec.prompts, spec.seeds)
                      if (c.checkpoint.label, c.prompt_index, c.seed) not in skip]
        self.results: dict[int, Cell] = {}
        self.queued: dict[str, int] = {}  # prompt_id -> cell index, until settled
        self.last_done = time.monotonic()

    def graph(self, index: int, names: Mapping[str, str]) -> Graph:
        cell = self.cells[index]
        kind = cell.checkpoint.kind
        prefix = filename_prefix(self.spec.sweep_id, cell)
        return patch_graph(self.graphs[kind], self.nodes[kind], cell, names[cell.checkpoint.label], prefix,
                           self.spec.sampling, self.spec.strengths.get(cell.checkpoint.label))

    def base_name(self) -> dict[str, str]:
        """{"base": the server's spelling of the workflow's own unet_name}, when the base is rendered."""
        if "base" not in self.nodes:
            return {}
        loader = self.nodes["base"].loader
        name = str(self.graphs["base"][loader]["inputs"].get("unet_name"))
        available = self.client.model_names("base")
        by_norm = {_norm(n): n for n in available}
        if _norm(name) in by_norm:
            return {BASE_LABEL: by_norm[_norm(name)]}
        near = closest(name, available)
        fix = f"add {shlex.quote(f'++eval.workflow_inputs.{loader}.unet_name={near[0]}')} (or another of those), " \
            if near else ""
        raise EvalError(
            f"eval.include_base: the workflow's base model {name!r} (node {loader} unet_name) is not one of "
            f"ComfyUI's {len(available)} diffusion models; closest: {near[:5]}. Fix: {fix}or add "
            "eval.include_base=false")

    def queue_all(self, names: Mapping[str, str]) -> None:
        graphs = [self.graph(i, names) for i in range(len(self.cells))]  # all patch errors before queueing
        for index, graph in enumerate(graphs):
            prompt_id, problem = self.client.queue_prompt(graph)
            if problem is None:
                self.queued[prompt_id] = index
                continue
            if prompt_id:  # 200 with node_errors: part of it was queued anyway
                self.client.cancel([prompt_id])
            self.record(index, _cell(self.cells[index], error=problem, prompt_id=prompt_id))

    def record(self, index: int, cell: Cell) -> None:
        self.results[index] = cell
        self.bar.update(1)
        self.bar.set_postfix_str(f"{cell.label} {cell.status}")

    def finish(self, prompt_id: str) -> None:
        index = self.queued.pop(prompt_id)
        spec = self.cells[index]
        entry = self.client.history(prompt_id)
        outcome = (
            parse_history(entry, self.nodes[spec.checkpoint.kind].save)
            if entry is not None
            else Outcome(False, error="ComfyUI lost the prompt: in neither /queue nor /history (restarted?)")
        )
        now = time.monotonic()
        seconds = outcome.seconds if outcome.seconds is not None else now - self.last_done
        cell = _cell(spec, prompt_id=prompt_id, seconds=seconds, error=outcome.error)
        self.last_done = now
        if outcome.ok:
            self.download(cell, outcome.images)
        self.record(index, cell)

    def download(self, cell: Cell, images: Sequence[ImageRef]) -> None:
        try:
            for image in images:
                self.keep(cell, image, self.client.view(image))
        except EvalError as exc:
            cell.error = str(exc)
            return
        cell.status = "ok"

    def keep(self, cell: Cell, image: ImageRef, data: bytes) -> None:
        cell.files.append(f"{image.subfolder}/{image.filename}".lstrip("/"))
        if self.save_dir is None:
            cell.images.append(data)
            return
        path = self.save_dir / Path(image.filename).name
        path.write_bytes(data)
        cell.paths.append(path)

    def expire(self, timeout_s: float) -> None:
        """Cancel what is still queued and mark it timed out."""
        self.client.cancel(list(self.queued))
        for prompt_id, index in sorted(self.queued.items(), key=lambda kv: kv[1]):
            self.record(index, _cell(self.cells[index], prompt_id=prompt_id, error=f"timed out after {timeout_s:g} s"))
        self.queued.clear()


def _wait(sweep: _Sweep, watcher: Watcher, deadline: float) -> None:
    while sweep.queued:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for prompt_id in watcher.settled(list(sweep.queued), min(left, 1.0)):
            sweep.finish(prompt_id)


def _cancel_quietly(client: ComfyClient, prompt_ids: Sequence[str]) -> None:
    """Best-effort cleanup on Ctrl-C: a failure is logged, the interrupt still propagates."""
    try:
        client.cancel(prompt_ids)
    except EvalError as exc:
        log.warning("could not cancel queued ComfyUI prompts %s: %s", list(prompt_ids), exc)


def run_sweep(
    client: ComfyClient,
    spec: SweepSpec,
    save_dir: Optional[Path] = None,
    timeout_s: float = 3600.0,
    poll_s: float = 0.5,
    progress: bool = True,
) -> list[Cell]:
    """Render the cells; one Cell per checkpoint x prompt x seed not in spec.skip, checkpoint-major.

    Model names are checked against /object_info before anything is queued.
    Ctrl-C (or Stopped) deletes our queued prompts and interrupts ours running, then raises
    SweepInterrupted with the cells finished so far.
    """
    deadline = time.monotonic() + timeout_s
    sweep = _Sweep(client, spec, save_dir)  # workflow problems surface before any request
    names = resolve_names(client, spec.checkpoints, spec.model_names) | sweep.base_name()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(sweep.cells), unit="cell", desc="comfyui", disable=not progress) as sweep.bar:
        watcher = Watcher(client, poll_s)
        try:
            sweep.queue_all(names)
            _wait(sweep, watcher, deadline)
        except KeyboardInterrupt as exc:
            _cancel_quietly(client, list(sweep.queued))
            raise SweepInterrupted.during(exc, [sweep.results[i] for i in sorted(sweep.results)]) from exc
        finally:
            watcher.close()
        if sweep.queued:
            sweep.expire(timeout_s)
    return [sweep.results[i] for i in range(len(sweep.cells))]
