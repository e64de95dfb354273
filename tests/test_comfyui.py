"""The ComfyUI sweep client against the stand-in server (tests/comfy_standin.py)."""

from __future__ import annotations

import _thread
import io
import json
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import pytest
import websocket
from PIL import Image

from sd3exp.errors import EvalError
from sd3exp.evaluate.cells import Cell, Sampling, plan_cells
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.evaluate.comfyui import (
    SAFETY_POLL_S,
    ComfyClient,
    EventLog,
    SweepSpec,
    check_api_format,
    find_nodes,
    listed_names,
    load_workflow,
    match_names,
    parse_history,
    prompt_rejection,
    render_seconds,
    run_sweep,
)
from tests.comfy_standin import StandIn, node_value

RUN = "run1"
PROMPTS = ["k4s4, a castle", "k4s4, a dragon"]
WORKFLOW = load_workflow(Path(__file__).parent.parent / "conf/workflows/sd3_api.json")


def ckpts(kind: str = "full", steps: Sequence[int] = (100, 200, 300)) -> list[Checkpoint]:
    return [Checkpoint(s, f"checkpoint-{s}", kind, Path(f"/out/checkpoint-{s}/x.safetensors")) for s in steps]


def names_for(checkpoints: Sequence[Checkpoint]) -> list[str]:
    return [f"{RUN}/{c.label}.safetensors" for c in checkpoints]


@pytest.fixture
def server(tmp_path: Path):
    with StandIn(tmp_path / "comfy_out", unet_names=names_for(ckpts()) + ["sd3_medium.safetensors"]) as s:
        yield s


def sweep(url: str, checkpoints: Sequence[Checkpoint], workflow: dict = WORKFLOW, **kwargs: Any) -> list[Cell]:
    spec_keys = {"seeds", "sampling", "nodes", "sweep_id", "prompts", "include_base"}
    spec_args = {"prompts": PROMPTS, **{k: kwargs.pop(k) for k in list(kwargs) if k in spec_keys}}
    names = dict(zip((c.label for c in checkpoints), names_for(checkpoints)))
    spec = SweepSpec(workflow, checkpoints, names, **spec_args)
    client = ComfyClient(url, retries=kwargs.pop("retries", 2), backoff_s=0.01)
    return run_sweep(client, spec, progress=False, **kwargs)


def embedded_graph(png: bytes) -> dict:
    """The API graph ComfyUI (and the stand-in) write into every PNG."""
    return json.loads(Image.open(io.BytesIO(png)).text["prompt"])


def is_cell(g: dict, label: str, prompt: str) -> bool:
    unet = node_value(g, "UNETLoader", "unet_name")
    return unet == f"{RUN}/{label}.safetensors" and g["3"]["inputs"]["text"] == prompt


def test_sweep_three_checkpoints_two_prompts_one_failing_cell(server: StandIn) -> None:
    server.error_if = lambda g: "CUDA out of memory" if is_cell(g, "checkpoint-200", PROMPTS[1]) else None
    cells = sweep(server.url, ckpts(), seeds=[7])
    assert [(c.label, c.prompt_index) for c in cells] == [
        (f"checkpoint-{s}", i) for s in (100, 200, 300) for i in (0, 1)
    ]
    ok = [c for c in cells if c.status == "ok"]
    assert len(ok) == 5
    failed = cells[3]
    assert failed.status == "error" and "CUDA out of memory" in failed.error and "KSampler" in failed.error
    for cell in ok:
        graph = embedded_graph(cell.images[0])
        assert is_cell(graph, cell.label, cell.prompt) and graph["6"]["inputs"]["seed"] == 7
    assert len({f for c in ok for f in c.files}) == 5


def test_cell_seconds_are_the_servers_render_time_not_the_wait(server: StandIn) -> None:
    server.delay_s, server.history_lag_s = 0.05, 0.6
    cells = sweep(server.url, ckpts(steps=(100, 200)))
    assert all(c.status == "ok" and 0.04 <= c.seconds < 0.5 for c in cells), [c.seconds for c in cells]


def test_render_seconds_reads_the_status_message_stamps() -> None:
    start = ["execution_start", {"prompt_id": "p", "timestamp": 1_000}]
    assert render_seconds([start, ["execution_success", {"prompt_id": "p", "timestamp": 3_500}]]) == 2.5
    assert render_seconds([start, ["execution_error", {"node_id": "6", "timestamp": 1_250}]]) == 0.25
    assert render_seconds([start, ["execution_success", {"prompt_id": "p"}]]) is None
    assert render_seconds([]) is None


def test_missing_model_name_fails_before_anything_is_queued(server: StandIn) -> None:
    server.unet_names = ["zzz/unrelated.safetensors"] + names_for(ckpts(steps=(100, 200)))
    with pytest.raises(EvalError) as err:
        sweep(server.url, ckpts())
    message = str(err.value)
    assert "run1/checkpoint-300.safetensors" in message and "3 name(s)" in message
    listed = message.split("closest first:")[1]
    assert listed.index("run1/checkpoint-") < listed.index("zzz/unrelated")
    assert server.queued == []


def test_windows_separators_in_names_are_matched() -> None:
    assert match_names({"a": "run1/checkpoint-1.safetensors"}, ["run1\\checkpoint-1.safetensors"], "UNETLoader") == {
        "a": "run1\\checkpoint-1.safetensors"
    }


def test_dropped_websocket_falls_back_to_polling(server: StandIn) -> None:
    server.drop_ws_after = 2
    started = time.monotonic()
    cells = sweep(server.url, ckpts())
    assert server.ws_drops == 1
    assert [c.status for c in cells] == ["ok"] * 6
    assert time.monotonic() - started < SAFETY_POLL_S  # the drop was noticed, not the safety poll


def test_a_text_frame_that_is_not_utf8_counts_as_a_dropped_websocket(server: StandIn) -> None:
    def garble(prompt_id: str) -> None:
        if prompt_id == server.queued[1]:
            for conn in (c for conns in server.sockets.values() for c in conns):
                conn.send(b"\xff\xfe not utf-8")

    server.on_done = garble
    cells = sweep(server.url, ckpts())
    assert [c.status for c in cells] == ["ok"] * 6


def test_two_sweeps_get_distinct_files_despite_the_cache(server: StandIn) -> None:
    first = sweep(server.url, ckpts()[:1])
    second = sweep(server.url, ckpts()[:1])
    assert set(first[0].files).isdisjoint(second[0].files)
    assert all(c.status == "ok" for c in first + second)
    again = sweep(server.url, ckpts()[:1], sweep_id="fixed")
    trap = sweep(server.url, ckpts()[:1], sweep_id="fixed")  # same graph: ComfyUI's cache answers
    assert trap[0].files == again[0].files  # the stand-in does model the trap


def test_files_the_websocket_named_are_fetched_without_asking_history(server: StandIn) -> None:
    cells = sweep(server.url, ckpts())
    assert [c.status for c in cells] == ["ok"] * 6 and all(embedded_graph(c.images[0]) for c in cells)
    assert [r for r in server.requests if "/history" in r] == []
    assert server.requests.count("GET /view") == 6 and server.requests.count("POST /prompt") == 6


@pytest.mark.parametrize("cached_executed, history_requests", [(True, 0), (False, 2)])
def test_a_cached_cell_gets_its_files_from_executed_or_else_from_history(
        server: StandIn, cached_executed: bool, history_requests: int) -> None:
    """Re-queueing identical graphs: every node is cached. ComfyUI >= 2024-08 still sends `executed`
    for the cached SaveImage; an older one sends none, and the files come from /history."""
    server.cached_executed = cached_executed
    first = sweep(server.url, ckpts()[:1], sweep_id="fixed")
    server.requests.clear()
    again = sweep(server.url, ckpts()[:1], sweep_id="fixed")
    assert [c.status for c in again] == ["ok", "ok"]
    assert [(c.files, c.images) for c in again] == [(c.files, c.images) for c in first]
    assert len([r for r in server.requests if r.startswith("GET /history/")]) == history_requests


def test_view_404_is_reported_per_cell(server: StandIn) -> None:
    server.lose_file_if = lambda g: is_cell(g, "checkpoint-100", PROMPTS[0])
    cells = sweep(server.url, ckpts()[:2])
    assert cells[0].status == "error" and "HTTP 404" in cells[0].error and cells[0].files == []
    assert [c.status for c in cells[1:]] == ["ok"] * 3


LORA_WORKFLOW = {
    **WORKFLOW,
    "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x", "strength_model": 1.0}},
    "6": {**WORKFLOW["6"], "inputs": {**WORKFLOW["6"]["inputs"], "model": ["10", 0]}},
    "1": {**WORKFLOW["1"], "inputs": {**WORKFLOW["1"]["inputs"], "unet_name": "sd3_medium.safetensors"}},
}


def test_lora_checkpoints_patch_lora_name_and_keep_the_base_model(server: StandIn) -> None:
    loras = ckpts("lora", (100, 200))
    server.lora_names = names_for(loras)
    cells = sweep(server.url, loras, LORA_WORKFLOW, prompts=PROMPTS[:1])
    assert [c.status for c in cells] == ["ok", "ok"]
    for cell in cells:
        graph = embedded_graph(cell.images[0])
        assert graph["10"]["inputs"]["lora_name"] == f"{RUN}/{cell.label}.safetensors"
        assert graph["1"]["inputs"]["unet_name"] == "sd3_medium.safetensors"


def test_base_column_renders_the_lora_workflow_without_its_lora(server: StandIn) -> None:
    loras = ckpts("lora", (100,))
    server.lora_names = names_for(loras)
    cells = sweep(server.url, loras, LORA_WORKFLOW, prompts=PROMPTS[:1], include_base=True)
    assert [(c.label, c.step, c.status) for c in cells] == [("base", None, "ok"), ("checkpoint-100", 100, "ok")]
    base, trained = (embedded_graph(c.images[0]) for c in cells)
    assert "10" not in base and base["6"]["inputs"]["model"] == ["1", 0]
    assert base["1"]["inputs"]["unet_name"] == "sd3_medium.safetensors" and "10" in trained


def test_base_column_of_a_full_finetune_keeps_the_workflows_unet(server: StandIn) -> None:
    workflow = {**WORKFLOW, "1": LORA_WORKFLOW["1"]}
    cells = sweep(server.url, ckpts(steps=(100,)), workflow, prompts=PROMPTS[:1], include_base=True)
    unets = [node_value(embedded_graph(c.images[0]), "UNETLoader", "unet_name") for c in cells]
    assert unets == ["sd3_medium.safetensors", f"{RUN}/checkpoint-100.safetensors"]


def test_a_base_model_comfyui_lacks_is_refused_before_queueing(server: StandIn) -> None:
    with pytest.raises(EvalError) as err:
        sweep(server.url, ckpts(), include_base=True)
    assert "sd3_medium_transformer.safetensors" in str(err.value) and "eval.workflow_inputs" in str(err.value)
    assert server.queued == []


def test_a_base_model_on_a_server_without_diffusion_models_gets_a_fix(tmp_path: Path) -> None:
    """Real ComfyUI 0.3.64 with an empty models/diffusion_models: the message read "Fix: or add ..."."""
    with StandIn(tmp_path / "comfy_out", unet_names=[]) as empty, pytest.raises(EvalError) as err:
        sweep(empty.url, [], include_base=True)
    assert "ComfyUI's 0 diffusion models" in str(err.value)
    assert "Fix: put sd3_medium_transformer.safetensors into ComfyUI's models/diffusion_models folder, or add " \
        "eval.include_base=false" in str(err.value)


@pytest.mark.parametrize("combo", [False, True])
def test_the_workflows_own_value_comfyui_refuses_stops_the_sweep_one_sd3exp_sets_fails_its_cells(tmp_path: Path,
                                                                                                   combo: bool) -> None:
    """KSampler sampler_name 'dpmpp_2m' (the workflow's) on a ComfyUI listing other samplers: no cell can render,
    nothing is queued; set by eval.sampler it is the cells' own value: each is tried and marked."""
    samplers = {"KSampler": {"sampler_name": ["euler", "dpmpp_2m_sde"]}}
    with StandIn(tmp_path / "out", unet_names=names_for(ckpts()), combos=samplers, combo=combo) as server:
        with pytest.raises(EvalError) as err:
            sweep(server.url, ckpts())
        set_per_cell = sweep(server.url, ckpts()[:1], sampling=Sampling(sampler="dpmpp_3m"))
    assert server.queued == [] and "Fix: add ++eval.workflow_inputs.6.sampler_name=dpmpp_2m_sde" in str(err.value)
    assert [c.status for c in set_per_cell] == ["error", "error"]
    assert all("sampler_name: 'dpmpp_3m' not in" in c.error for c in set_per_cell)


def test_object_info_combo_shape(server: StandIn) -> None:
    server.combo = True
    assert [c.status for c in sweep(server.url, ckpts()[:1])] == ["ok", "ok"]


def test_listed_names_reads_both_shapes() -> None:
    plain = {"UNETLoader": {"input": {"required": {"unet_name": [["a", "b"]]}}}}
    combo = {"UNETLoader": {"input": {"required": {"unet_name": ["COMBO", {"options": ["a", "b"]}]}}}}
    assert listed_names(plain, "UNETLoader", "unet_name") == ["a", "b"]
    assert listed_names(combo, "UNETLoader", "unet_name") == ["a", "b"]
    with pytest.raises(EvalError, match="no UNETLoader"):
        listed_names({}, "UNETLoader", "unet_name")


def test_http_400_node_errors_become_cell_errors(server: StandIn) -> None:
    cells = sweep(server.url, ckpts()[:1], sampling=Sampling(steps=0))
    assert all(c.status == "error" for c in cells)
    assert "prompt_outputs_failed_validation" in cells[0].error and "node 6 (KSampler)" in cells[0].error
    assert server.queued == []


def test_200_with_node_errors_is_a_failure_and_is_dequeued(server: StandIn) -> None:
    server.delay_s = 0.2
    server.partial_if = lambda g: is_cell(g, "checkpoint-300", PROMPTS[1])
    cells = sweep(server.url, ckpts())
    assert [c.status for c in cells] == ["ok"] * 5 + ["error"]
    assert "LoadImage" in cells[5].error and server.deleted == [cells[5].prompt_id]


def test_ctrl_c_interrupts_and_deletes_our_pending_prompts(server: StandIn) -> None:
    server.delay_s = 0.3
    server.on_done = lambda prompt_id: _thread.interrupt_main() if prompt_id == server.queued[0] else None
    with pytest.raises(KeyboardInterrupt):
        sweep(server.url, ckpts())
    time.sleep(0.1)
    state = server.queue_state()
    assert state["queue_pending"] == [] and state["queue_running"] == []
    assert set(server.deleted) | set(server.interrupts) == set(server.queued[1:])  # all but the finished one


def test_ctrl_c_while_cells_are_still_being_queued_stops_the_queueing_and_deletes_what_was_queued(
        server: StandIn) -> None:
    """Each POST /prompt answered 0.1 s after the prompt was queued (it runs meanwhile): Ctrl-C comes as the
    second finishes, before the rest are queued."""
    server.delay_s, server.answer_lag_s = 0.0, 0.1
    server.on_done = lambda prompt_id: _thread.interrupt_main() if prompt_id in server.queued[1:2] else None
    with pytest.raises(KeyboardInterrupt):
        sweep(server.url, ckpts())
    time.sleep(0.1)
    state = server.queue_state()
    assert state["queue_pending"] == [] and state["queue_running"] == []
    assert 2 <= len(server.queued) < 6  # the queueing stopped


def test_overall_timeout_marks_and_cancels_the_rest(server: StandIn) -> None:
    server.delay_s = 0.6
    cells = sweep(server.url, ckpts()[:1], timeout_s=0.3)
    assert [c.status for c in cells] == ["error", "error"]
    assert all("timed out after 0.3 s" in c.error for c in cells)
    assert server.deleted == [cells[1].prompt_id] and server.interrupts == [cells[0].prompt_id]


def test_unreachable_server_is_retried_then_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EvalError, match="cannot reach ComfyUI.*3 tries"):
        sweep(f"http://127.0.0.1:{port}", ckpts(), retries=2)


def test_the_environments_proxy_is_used(server: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session reads the environment once; a proxy set there still carries every request."""
    monkeypatch.setenv("HTTP_PROXY", server.url)  # the stand-in answers proxy-form request lines too
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert ComfyClient("http://comfyui.invalid:8188", retries=0).queue() == (set(), set())


def test_api_prefix_and_save_dir(server: StandIn, tmp_path: Path) -> None:
    cells = sweep(server.url + "/api", ckpts()[:1], save_dir=tmp_path / "imgs", prompts=PROMPTS[:1])
    assert cells[0].status == "ok" and cells[0].images == []
    assert cells[0].paths == [tmp_path / "imgs" / "checkpoint-100_p0_s0.png"]  # named by cell, as eval/images
    assert embedded_graph(cells[0].paths[0].read_bytes())


def test_standin_sends_executing_null_after_history_and_success_before(tmp_path: Path) -> None:
    """The property the client relies on; a client finishing on execution_success would see {}."""
    with StandIn(tmp_path, unet_names=["m"], history_lag_s=0.2) as server:
        ws = websocket.create_connection(f"ws://{server.url[7:]}/ws?clientId=me", timeout=5)
        graph = json.loads(json.dumps(WORKFLOW))
        graph["1"]["inputs"]["unet_name"] = "m"
        client = ComfyClient(server.url)
        client.client_id = "me"
        prompt_id, problem, _ = client.queue_prompt(graph)
        events, binary, history_at = [], 0, {}
        while not events or events[-1] != ("executing", None):
            message = ws.recv()
            if isinstance(message, bytes):
                binary += 1
                continue
            event = json.loads(message)
            events.append((event["type"], event["data"].get("node", "-")))
            if events[-1] in (("execution_success", "-"), ("executing", None)):
                history_at[event["type"]] = client.history(prompt_id)
        ws.close()
    assert problem is None
    kinds = [k for k, _ in events]
    assert kinds.index("execution_start") < kinds.index("executed") < kinds.index("execution_success")
    assert binary > 0 and history_at["execution_success"] is None and history_at["executing"] is not None


# ---------------------------------------------------------------- pure core


def test_positive_is_the_prompt_wired_to_ksampler_positive() -> None:
    swapped = json.loads(json.dumps(WORKFLOW))
    swapped["6"]["inputs"]["positive"], swapped["6"]["inputs"]["negative"] = ["4", 0], ["3", 0]
    nodes = find_nodes(swapped, "full")
    assert (nodes.positive, nodes.negative, nodes.loader, nodes.save, nodes.latent) == ("4", "3", "1", "9", "5")
    assert find_nodes(swapped, "full", {"positive": "3"}).positive == "3"


def test_node_lookup_errors_name_the_fix() -> None:
    with pytest.raises(EvalError, match="no LoraLoaderModelOnly node; add one"):
        find_nodes(WORKFLOW, "lora")
    with pytest.raises(EvalError, match="eval.nodes.save='42'"):
        find_nodes(WORKFLOW, "full", {"save": "42"})
    with pytest.raises(EvalError, match="UI-format"):
        check_api_format({"nodes": [], "links": []}, "wf.json")


def test_cells_are_checkpoint_major() -> None:
    cells = plan_cells(ckpts(steps=(1, 2)), ["a", "b"], [5, 6])
    assert [(c.checkpoint.step, c.prompt, c.seed) for c in cells][:5] == [
        (1, "a", 5), (1, "a", 6), (1, "b", 5), (1, "b", 6), (2, "a", 5)
    ]


def test_response_parsing() -> None:
    assert prompt_rejection(200, {"prompt_id": "x", "number": 1, "node_errors": {}}) is None
    errors = {"7": {"errors": [{"message": "m", "details": "d"}], "class_type": "C"}}
    partial = {"prompt_id": "x", "node_errors": errors}
    assert prompt_rejection(200, partial) == "ComfyUI rejected the prompt (HTTP 200): node 7 (C): m: d"
    interrupted = {"status": {"status_str": "error", "messages": [["execution_interrupted", {"node_id": "6"}]]}}
    assert parse_history(interrupted, "9").error == "interrupted at node 6"
    assert "without images" in parse_history({"status": {"status_str": "success"}, "outputs": {}}, "9").error


def test_event_log_trusts_only_a_success_that_named_the_save_nodes_images() -> None:
    def log(*events: tuple[str, dict]) -> EventLog:
        out = EventLog()
        for kind, data in events:
            out.add(json.dumps({"type": kind, "data": {"prompt_id": "p", **data}}))
        return out

    start, success = ("execution_start", {"timestamp": 1_000}), ("execution_success", {"timestamp": 1_500})
    image = {"filename": "a_00001_.png", "subfolder": "s", "type": "output"}
    named = ("executed", {"node": "9", "output": {"images": [image]}})
    told = log(start, named, success).pop("p", "9")
    assert told is not None and told.ok and told.images[0].filename == "a_00001_.png" and told.seconds == 0.5
    assert log(start, named, ("execution_error", {"node_id": "6"})).pop("p", "9") is None  # /history says why
    assert log(start, ("executed", {"node": "9", "output": None}), success).pop("p", "9") is None
    assert log(start, named, success).pop("p", "8") is None  # another save node
    assert EventLog().add(json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "p"}})) == "p"
    assert EventLog().add(b"\x00\x00\x00\x01png") is None
