"""A Hydra callback that keeps Hydra from making the run folder: sd3exp makes it itself, after every
check that can refuse the command (a refused command leaves no folder behind, not even an empty one
inside a dataset or a read-only disk).

Hydra makes `hydra.run.dir` before the task runs. For a single run this callback points Hydra at the
current folder (which exists, so Hydra makes nothing) and gives the job back its real folder as
`hydra.runtime.output_dir`, where sd3exp reads it (sd3exp/job.py Invocation, sd3exp.run_dir).
Multiruns keep Hydra's own handling: their jobs' folders are made by the launcher.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class DeferRunDir(Callback):
    def __init__(self) -> None:
        self.run_dir: Optional[str] = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the run folder's interpolations read Hydra's node
        self.run_dir = os.path.abspath(os.path.expanduser(str(OmegaConf.select(config, "hydra.run.dir"))))
        with read_write(config.hydra):
            config.hydra.run.dir = os.getcwd()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_dir is None:
            return
        kept = HydraConfig.instance().cfg  # run_job's copy of this config's hydra node, made just before
        mirror = kept is not None and kept.hydra._get_parent() is config  # type: ignore[attr-defined]
        for node in (config.hydra, kept.hydra) if mirror else (config.hydra,):  # type: ignore[union-attr]
            with read_write(node), open_dict(node.runtime):
                node.run.dir = node.runtime.output_dir = self.run_dir
        if not mirror:
            HydraConfig.instance().set_config(config)  # a copy of the whole node (10-20 ms)
