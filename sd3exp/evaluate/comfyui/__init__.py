"""Render every checkpoint x prompt x seed through ComfyUI's HTTP + websocket API.

Pure core: workflow patching (`workflow`: find_nodes, patch_graph), model names and /object_info
(`names`), /prompt, /history and websocket shapes (`protocol`). I/O: the HTTP + websocket client
(`client`: ComfyClient, retries) and the sweep (`sweep`: run_sweep). `backend.render` is the eval
stage's entry, the same `render(cfg, job, run_dir, images) -> list[Cell]` every backend offers.
"""

from sd3exp.evaluate.comfyui.backend import render
from sd3exp.evaluate.comfyui.client import SAFETY_POLL_S, ComfyClient, Watcher
from sd3exp.evaluate.comfyui.names import closest, listed_names, match_names
from sd3exp.evaluate.comfyui.protocol import (
                                              EventLog,
                                              ImageRef,
                                              Outcome,
                                              node_errors_text,
                                              parse_history,
                                              prompt_rejection,
                                              render_seconds,
                                              ws_url,
)
from sd3exp.evaluate.comfyui.sweep import SweepSpec, resolve_names, run_sweep
from sd3exp.evaluate.comfyui.workflow import (
                                              LOADERS,
                                              Graph,
                                              NodeIds,
                                              base_workflow,
                                              cell_edits,
                                              check_api_format,
                                              filename_prefix,
                                              find_nodes,
                                              load_workflow,
                                              new_sweep_id,
                                              node_override,
                                              patch_graph,
                                              with_inputs,
                                              without_node,
)

__all__ = ["LOADERS", "SAFETY_POLL_S", "ComfyClient", "EventLog", "Graph", "ImageRef", "NodeIds", "Outcome", "SweepSpec",
           "Watcher", "base_workflow", "cell_edits", "check_api_format", "closest", "filename_prefix", "find_nodes",
           "listed_names", "load_workflow", "match_names", "new_sweep_id", "node_errors_text",
           "node_override", "parse_history", "patch_graph", "prompt_rejection", "render", "render_seconds",
           "resolve_names", "run_sweep", "with_inputs", "without_node", "ws_url"]
