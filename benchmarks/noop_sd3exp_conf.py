"""A second baseline of bench_compile.py: the no-op app composing sd3exp's own config (conf/, its
schema and resolvers; bench_compile.py drops its callbacks): what Hydra itself costs for this config
tree, with nothing of sd3exp's run.

    python benchmarks/noop_sd3exp_conf.py experiment=fantasy_art stage=compile '~hydra.callbacks'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sd3exp.project import CONF_DIR, register

register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """Nothing."""


if __name__ == "__main__":
    main()
