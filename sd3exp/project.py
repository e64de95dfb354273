"""Where the project's files are (conf/, templates/, the worker scripts) and the Hydra set-up
every entry point shares: the typed schema and sd3exp's config resolvers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from sd3exp import schema, stage_table

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
TEMPLATES = ROOT / "templates"
WORKERS = Path(__file__).resolve().parent / "workers"


def project_root() -> str:
    return os.environ.get("SD3EXP_ROOT", str(ROOT))


def experiment_name(choice: Optional[str]) -> str:
    return "default" if choice in (None, "None", "null") else str(choice).replace("/", "_")


def run_suffix(task: List[str]) -> str:
    """`/k=v,k2=v2` for the run folder of a command line with training overrides, '' without."""
    from sd3exp.runfolder import training_overrides

    safe = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", training_overrides(task))
    return f"/{safe[:120]}" if safe else ""


def run_dir(*, _root_: DictConfig) -> str:
    """Hydra's output folder for a job of this config; before one starts (e.g. --cfg), the folder it
    would use. A job's own config is given it by sd3exp.job.located (the task has no hydra node)."""
    if "hydra" in _root_:
        return str(OmegaConf.select(_root_, "hydra.runtime.output_dir", default=None) or _root_.hydra.run.dir)
    return f"{_root_.paths.output_root}/{_root_.name}"


def lora_only(model_type: str, value: str, otherwise: str = "no_change") -> str:
    """`value` for a LoRA, `otherwise` for a full fine-tune (memory presets: a quantised base is LoRA-only)."""
    return value if model_type == "lora" else otherwise


def register() -> None:
    """Schema and resolvers; safe to call more than once."""
    schema.register()
    resolvers: Dict[str, Callable[..., Any]] = {
        "sd3exp.root": project_root, "sd3exp.name": experiment_name, "sd3exp.run_suffix": run_suffix,
        "sd3exp.run_dir": run_dir, "sd3exp.stages": stage_table.names, "sd3exp.lora_only": lora_only}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
