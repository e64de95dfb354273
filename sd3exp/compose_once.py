"""Each job of a sweep composed once, not twice.

Hydra's basic sweeper composes every job of a batch to check that all of them can be composed before the
first one runs (Sweeper.validate_batch_is_legal), then its launcher composes each job again to run it
(`load_sweep_config` in BasicLauncher, and in the submitit/Slurm launcher before it pickles a job). For
sd3exp's config tree a composition is most of what a compile costs, so the checked composition is kept and
handed to the launcher: the whole batch is still checked before the first job starts, and each job runs the
config composed at that check (when the sweep started), not a second composition of the same files.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_loader import ConfigLoader
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigSource
from hydra.types import RunMode
from omegaconf import DictConfig

Key = Tuple[int, Tuple[str, ...]]


class ComposedOnce(ConfigLoader):
    """Hydra's config loader, keeping each job's composition from the batch check until its launch."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.checked: Dict[Key, DictConfig] = {}

    def __getstate__(self) -> Dict[str, Any]:
        """A launcher that pickles the loader for its jobs (submitit, Slurm) sends none of the kept configs:
        a job composed in another process composes itself there, as with Hydra's own sweeper."""
        return {"loader": self.loader, "checked": {}}

    def check(self, master_config: DictConfig, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job of the batch (raising the first error before any job runs) and keep each, in
        place of the previous batch's (a launcher that composed its jobs elsewhere took none of them)."""
        self.checked = {}
        for overrides in batch:
            key = (id(master_config), tuple(overrides))
            self.checked[key] = self.loader.load_sweep_config(master_config, list(overrides))

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        kept = self.checked.pop((id(master_config), tuple(sweep_overrides)), None)
        return kept if kept is not None else self.loader.load_sweep_config(master_config, sweep_overrides)

    def load_configuration(self, config_name: Optional[str], overrides: List[str], run_mode: RunMode,
                           from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
        return self.loader.load_configuration(config_name, overrides, run_mode, from_shell, validate_sweep_overrides)

    def get_search_path(self) -> ConfigSearchPath:
        return self.loader.get_search_path()

    def get_sources(self) -> List[ConfigSource]:
        return self.loader.get_sources()

    def list_groups(self, parent_name: str) -> List[str]:
        return self.loader.list_groups(parent_name)

    def get_group_options(self, group_name: str, results_filter: Optional[ObjectType] = ObjectType.CONFIG,
                          config_name: Optional[str] = None, overrides: Optional[List[str]] = None) -> List[str]:
        return self.loader.get_group_options(group_name, results_filter, config_name, overrides)

    def compute_defaults_list(self, config_name: Optional[str], overrides: List[str],
                              run_mode: RunMode) -> Any:
        return self.loader.compute_defaults_list(config_name, overrides, run_mode)

