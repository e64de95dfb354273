"""Entry point: `sd3exp [hydra overrides]` runs the pipeline; a few subcommands do set-up and review."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sd3exp import migrate, schema
from sd3exp.errors import DiskFullError, Interrupted, Sd3expError, no_space_message

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"


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
    """Hydra's output folder for this job; outside a job (e.g. --cfg), the folder it would use."""
    try:
        out = HydraConfig.get().runtime.output_dir
    except (ValueError, OmegaConfBaseException):
        out = None
    if out:
        return str(out)
    if "hydra" in _root_:
        return str(_root_.hydra.run.dir)
    return f"{_root_.paths.output_root}/{_root_.name}"


def register() -> None:
    """Schema and resolvers; safe to call more than once."""
    schema.register()
    for name, fn in {"sd3exp.root": project_root, "sd3exp.name": experiment_name,
                     "sd3exp.run_suffix": run_suffix, "sd3exp.run_dir": run_dir}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def fail(err: Sd3expError) -> None:
    print(f"sd3exp: error: {err}", file=sys.stderr)
    raise SystemExit(err.exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from sd3exp.pipeline import run

    try:
        try:
            return run(cfg)  # the objective, for sweepers
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise DiskFullError(f"{no_space_message(Path(err.filename or cfg.paths.run_dir))}; the files "
                                "written before are kept (each is written whole or not at all)") from err
    except Sd3expError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN and not isinstance(err, Interrupted):
            print(f"sd3exp: error in job {HydraConfig.get().job.num}: {err}", file=sys.stderr)
            raise  # Hydra marks this job failed, finishes the batch, then exits non-zero
        fail(err)


def _subcommands() -> Dict[str, Callable[[List[str]], int]]:
    from sd3exp import commands

    return commands.SUBCOMMANDS


def main() -> None:
    register()
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        subcommands = _subcommands()
        if sys.argv[1] in subcommands:
            try:
                raise SystemExit(subcommands[sys.argv[1]](sys.argv[2:]))
            except Sd3expError as err:
                fail(err)
    try:
        sys.argv = migrate.prepare_argv(sys.argv, CONF_DIR)
    except Sd3expError as err:
        fail(err)
    _hydra_main()
