"""The baseline of bench_compile.py: a Hydra 1.3 app that composes a config and does nothing.

Its config has the keys the benchmark's command lines override, so both apps get the same
arguments: `python benchmarks/noop_hydra_app.py experiment=fantasy_art stage=compile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore


@dataclass
class Optimizer:
    lr: float = 1e-4


@dataclass
class Lora:
    rank: int = 16


@dataclass
class Config:
    experiment: str = ""
    stage: str = "compile"
    optimizer: Optimizer = field(default_factory=Optimizer)
    lora: Lora = field(default_factory=Lora)


ConfigStore.instance().store(name="noop", node=Config)


@hydra.main(version_base="1.3", config_path=None, config_name="noop")
def main(cfg: Config) -> None:
    """Nothing: what is left is Hydra's own start-up, composition and output folder."""


if __name__ == "__main__":
    main()
