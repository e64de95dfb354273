"""Entry point: `sd3exp [hydra overrides]` runs the pipeline; a few subcommands do set-up and review."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sd3exp import argv
from sd3exp.added_keys import check_added
from sd3exp.errors import DiskFullError, Interrupted, RunConflictError, Sd3expError, no_space_message
from sd3exp.field_types import check_experiment_file, check_overrides
from sd3exp.project import CONF_DIR, register


def fail(err: Sd3expError) -> NoReturn:
    if os.environ.get("SD3EXP_DEBUG") == "1":  # the code path behind the message (as HYDRA_FULL_ERROR=1)
        traceback.print_exception(err, file=sys.stderr)
    print(f"sd3exp: error: {err}", file=sys.stderr)
    raise SystemExit(err.exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from sd3exp.job import Invocation, located
    from sd3exp.pipeline import run

    invocation = Invocation.of(cast(DictConfig, HydraConfig.get()))  # typed as HydraConf; a DictConfig at run time
    cfg = located(cfg, invocation)
    try:
        try:
            return run(cfg, invocation)  # the objective, for sweepers
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise RunConflictError(f"cannot write {err.filename}: {err.strerror} (nothing was written there). "
                                       "Fix: point hydra.run.dir (or paths.output_root) at a folder you can write, "
                                       "e.g. hydra.run.dir=$HOME/sd3exp-runs/NAME") from err
            if err.errno != errno.ENOSPC:
                raise
            raise DiskFullError(f"{no_space_message(Path(err.filename or cfg.paths.run_dir))}; the files "
                                "written before are kept (each is written whole or not at all)") from err
    except Sd3expError as err:
        if invocation.multirun and not isinstance(err, Interrupted):
            print(f"sd3exp: error in job {HydraConfig.get().job.num}: {err}", file=sys.stderr)
            raise  # Hydra marks this job failed, finishes the batch, then exits non-zero
        fail(err)


def _subcommands() -> Dict[str, Callable[[List[str]], int]]:
    from sd3exp import commands

    return commands.SUBCOMMANDS


def main() -> None:
    register()
    if len(sys.argv) == 1:  # a bare `sd3exp`: the help, which lists the experiments
        sys.argv.append("--help")
    if "--version" in sys.argv[1:]:
        print(argv.versions())
        raise SystemExit(0)
    if not sys.argv[1].startswith(("-", "+", "~")) and "=" not in sys.argv[1]:
        subcommands = _subcommands()
        try:
            if sys.argv[1] not in subcommands:
                raise argv.unknown_word(sys.argv[1], sys.argv[2:], subcommands, CONF_DIR)
            raise SystemExit(subcommands[sys.argv[1]](sys.argv[2:]))
        except Sd3expError as err:
            fail(err)
    from sd3exp import migrate

    sys.argv = argv.expand_home(sys.argv)
    try:
        check_added(sys.argv[1:], CONF_DIR)
        argv.check_choices(sys.argv[1:], CONF_DIR)
        check_overrides(sys.argv[1:])
        check_experiment_file(sys.argv[1:], CONF_DIR)
        sys.argv = migrate.prepare_argv(sys.argv, CONF_DIR)
    except Sd3expError as err:
        fail(err)
    from sd3exp.compose_once import compose_runs_once

    compose_runs_once()
    _hydra_main()
