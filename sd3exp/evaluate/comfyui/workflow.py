"""ComfyUI API-format workflows (pure): reading one, finding the nodes a sweep patches by class_type
and wiring, and the patched copy each cell is queued as."""

from __future__ import annotations

import copy
import json
import shlex
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from sd3exp.errors import EvalError
from sd3exp.evaluate.cells import CellSpec, Sampling

Graph = dict[str, dict[str, Any]]
# kind -> (loader class_type, model input, eval.nodes key)
LOADERS = {"full": ("UNETLoader", "unet_name", "unet"), "lora": ("LoraLoaderModelOnly", "lora_name", "lora")}
LOADERS["base"] = LOADERS["full"]  # the base model: the workflow's own unet_name


def load_workflow(path: Path | str | None) -> Graph:
    """Read an API-format workflow ("Save (API Format)" in ComfyUI); None: eval.workflow is not set."""
    if path is None:
        raise EvalError("eval.workflow is not set; eval.backend=comfyui needs an API-format workflow")
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



def new_sweep_id() -> str:
    """A timestamped id that no earlier sweep used."""
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def filename_prefix(sweep_id: str, cell: CellSpec) -> str:
    """SaveImage prefix, unique per sweep and cell (defeats ComfyUI's output cache)."""
    return f"sd3exp/{sweep_id}/{cell.checkpoint.label}{cell.variant.name}_p{cell.prompt_index}_s{cell.seed}"


def shift_node(graph: Graph, overrides: Mapping[str, str], shift: float) -> str:
    """The ModelSamplingSD3 node eval.shift is set on; EvalError when the workflow has none."""
    explicit = _override(graph, overrides, "shift")
    ids = [explicit] if explicit else sorted(i for i, n in graph.items() if n["class_type"] == "ModelSamplingSD3")
    if len(ids) != 1:
        fix = f"name the one to use, e.g. {node_override('shift', ids[0])}" if ids else \
            "add a ModelSamplingSD3 node between the model loader and the KSampler, or leave eval.shift unset"
        raise EvalError(f"eval.shift={shift:g}: the workflow has {len(ids)} ModelSamplingSD3 nodes. Fix: {fix}")
    return ids[0]


_ATOMS = (str, int, float, bool, type(None))


def copy_graph(value: Any) -> Any:
    """copy.deepcopy for a graph's JSON data (plain dicts, lists, strings, numbers) at a third of its cost,
    as patch_graph copies the workflow for every cell; anything else is deep-copied."""
    kind = type(value)
    if kind is dict:
        return {k: copy_graph(v) for k, v in value.items()}
    if kind is list:
        return [copy_graph(v) for v in value]
    return value if kind in _ATOMS else copy.deepcopy(value)


Edit = tuple[str, Optional[str], str, Any]  # role, node id (None: the workflow has no such node), input, value


def cell_edits(nodes: NodeIds, cell: CellSpec, model_name: str, prefix: str, sampling: Sampling = Sampling(),
               strength: Optional[float] = None) -> list[Edit]:
    """The inputs patch_graph sets for one cell; a None value leaves the workflow's own."""
    return [
        ("loader", nodes.loader, LOADERS[cell.checkpoint.kind][1], model_name),
        ("loader", nodes.loader, "strength_model", strength),
        ("positive", nodes.positive, "text", cell.prompt),
        ("sampler", nodes.sampler, "seed", cell.seed),
        ("save", nodes.save, "filename_prefix", prefix),
        ("negative", nodes.negative, "text", sampling.negative_prompt),
        ("sampler", nodes.sampler, "steps", sampling.steps),
        ("sampler", nodes.sampler, "cfg", sampling.cfg),
        ("sampler", nodes.sampler, "sampler_name", sampling.sampler),
        ("sampler", nodes.sampler, "scheduler", sampling.scheduler),
        ("latent", nodes.latent, "width", sampling.width),
        ("latent", nodes.latent, "height", sampling.height),
    ]


def patch_graph(graph: Graph, edits: Sequence[Edit]) -> Graph:
    """A copy of the graph with one cell's `edits` (cell_edits) made; EvalError for a value set on a role
    the workflow has no node for."""
    out = copy_graph(graph)
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


def with_inputs(graph: Graph, inputs: Mapping[str, Any]) -> Graph:
    """eval.workflow_inputs applied: your text-encoder, VAE and base-model names without editing the JSON."""
    for node_id, values in inputs.items():
        if node_id not in graph:
            raise EvalError(f"eval.workflow_inputs.{node_id}: the workflow has no node {node_id!r}. "
                            f"Fix: use one of its node ids: {', '.join(sorted(graph))}")
        graph[node_id]["inputs"].update(values)
    return graph
