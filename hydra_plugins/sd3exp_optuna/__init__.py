"""Hydra's door to sd3exp's Optuna sweeper (sd3exp/optuna_sweep/).

Hydra instantiates a sweeper only from a class in the `hydra_plugins` namespace package that its plugin
scan found (hydra/core/plugins.py: "Invalid plugin ... not the hydra_plugins package"), so this thin
class is that door; everything else lives in sd3exp.optuna_sweep. Hydra imports this module on every
start-up (its plugin scan), so it imports neither optuna nor sd3exp's sweeper until a sweep begins.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


def plainly(step: Callable[[], Any]) -> Any:
    """An sd3exp error (a bad sweeper setting) as sd3exp's one-paragraph error, not a traceback."""
    from sd3exp.errors import Sd3expError

    try:
        return step()
    except Sd3expError as err:
        print(f"sd3exp: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=sd3exp_optuna` (conf/hydra/sweeper/sd3exp_optuna.yaml)."""

    def __init__(self, **options: Any) -> None:
        from sd3exp.optuna_sweep import OptunaSweeper as Impl

        self.impl = plainly(lambda: Impl(**options))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        plainly(lambda: self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config))

    def sweep(self, arguments: List[str]) -> Optional[Any]:
        return plainly(lambda: self.impl.sweep(arguments))
