"""Test helpers: composing experiments, running the CLI, finding the trainer venv, the `trainer` mark."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from sd3exp.cli import main
from sd3exp.project import CONF_DIR, ROOT, register
from sd3exp.schema import ExperimentConfig
from sd3exp.trainer_env import READY, managed_root

register()


def compose_experiment(experiment: Optional[str], overrides: List[str] = (), run_dir: str = "/tmp/sd3exp-run") -> ExperimentConfig:
    """The typed experiment as Hydra composes it (no run folder is created)."""
    GlobalHydra.instance().clear()
    name = experiment or "default"
    extra = [f"experiment={experiment}"] if experiment else []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=extra + [f"name={name}", f"paths.run_dir={run_dir}", *overrides])
    return OmegaConf.to_object(cfg)


def run_cli(*args: str, cwd: Path = ROOT, env: Optional[dict] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m sd3exp ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "sd3exp", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`sd3exp ARGS` for a subcommand (diff, lock) run in this process: what run_cli returns, without
    starting a Python for it."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["sd3exp", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["sd3exp", *args], code, out.getvalue(), err.getvalue())


def trainer_python() -> Optional[Path]:
    if os.environ.get("SD3EXP_TRAINER_PYTHON"):
        return Path(os.environ["SD3EXP_TRAINER_PYTHON"])
    root = managed_root("4.10.1", None)
    return root / "bin" / "python" if (root / READY).is_file() else None


# A test that needs the trainer venv: it is marked `trainer` (so `-m "not trainer"` leaves it out) and
# skipped where the venv is not installed (tests/helpers.py).
needs_trainer = pytest.mark.needs_trainer
NO_TRAINER = trainer_python() is None and os.environ.get("CI") != "true"


def reference_scores(script: Path, job: dict, tmp: Path) -> dict:
    """The scores a tiny model's reference script (tests/tiny_*.py) computes for a scoring job, run
    in the trainer venv offline: what sd3exp's own scoring is compared with."""
    from sd3exp.tinymodel import OFFLINE_ENV

    (tmp / "job.json").write_text(json.dumps(job))
    ref = subprocess.run([str(trainer_python()), str(script), "reference", str(tmp / "job.json"), str(tmp / "ref.json")],
                         capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return json.loads((tmp / "ref.json").read_text())


def node_flags(cfg: DictConfig) -> List[Tuple[str, Any, Any, str]]:
    """Every node's struct and readonly flags and node type, by key: what YAML does not show of a config."""
    nodes: List[Tuple[str, Any]] = [("", cfg)]
    out = []
    while nodes:
        key, node = nodes.pop()
        out.append((key, OmegaConf.is_struct(node), OmegaConf.is_readonly(node), type(node).__name__))
        if isinstance(node, DictConfig):
            nodes += [(f"{key}.{k}", node._get_node(k)) for k in node.keys()]
    return sorted(out)


class CountingLoader:
    """Hydra's own config loader, counting its compositions (of runs: load_configuration; of a sweep's jobs:
    load_sweep_config)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.repository, self.composed = loader, loader.repository, 0

    def get_search_path(self) -> Any:
        return self.loader.get_search_path()

    def load_configuration(self, config_name: Optional[str], overrides: List[str], run_mode: Any) -> DictConfig:
        self.composed += 1
        return self.loader.load_configuration(config_name, overrides, run_mode)

    def load_sweep_config(self, master: DictConfig, overrides: List[str]) -> DictConfig:
        self.composed += 1
        return self.loader.load_sweep_config(master, overrides)
