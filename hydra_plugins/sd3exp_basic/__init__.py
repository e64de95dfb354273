"""Hydra's door to sd3exp's default sweeper: Hydra's basic sweeper, each job composed once
(sd3exp/compose_once.py). Hydra instantiates a sweeper only from a class in the `hydra_plugins`
namespace package, so the class lives here; it imports nothing Hydra's plugin scan does not already.
"""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper as HydraBasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sd3exp.compose_once import ComposedOnce


class BasicSweeper(HydraBasicSweeper):
    """Hydra's basic sweeper (same settings: max_batch_size, params); the launcher runs the checked configs."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        loader = hydra_context.config_loader  # sd3exp's get_mode has made it a ComposedOnce already
        once = loader if isinstance(loader, ComposedOnce) else ComposedOnce(loader)
        context = HydraContext(config_loader=once, callbacks=hydra_context.callbacks)
        super().setup(hydra_context=context, task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        assert isinstance(loader, ComposedOnce)
        loader.check(self.config, batch)
