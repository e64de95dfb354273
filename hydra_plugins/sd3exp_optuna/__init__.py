"""Hydra's door to sd3exp's Optuna sweeper (sd3exp/optuna_sweep/).

Hydra instantiates a sweeper only from a class in the `hydra_plugins` namespace package that its plugin
scan found (hydra/core/plugins.py: "Invalid plugin ... not the hydra_plugins package"), so this thin
class is that door; everything else lives in sd3exp.optuna_sweep. Hydra imports this module on every
start-up (its plugin scan), so it imports neither optuna nor sd3exp's sweeper until a sweep begins.
"""

from __future__ import annotations

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=sd3exp_optuna` (conf/hydra/sweeper/sd3exp_optuna.yaml)."""

    def __init__(self, **options: Any) -> None:
        from sd3exp.optuna_sweep import OptunaSweeper as Impl

        self.impl = Impl(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Optional[Any]:
        return self.impl.sweep(arguments)
