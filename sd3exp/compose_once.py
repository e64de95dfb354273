"""Each run and each job of a sweep composed once, not twice.

Before a run, Hydra composes the whole config to read `hydra.mode` (Hydra.get_mode), then composes it again
to run it. sd3exp's get_mode composes it as the run would and keeps it: the run that follows takes that
composition (read back from the user's cache where nothing it is made from changed: sd3exp/compose_cache.py),
with the `hydra.mode=RUN` override Hydra adds applied to it. Anything else (a multirun, a
command line the run composition refuses) composes as Hydra does.

Hydra's basic sweeper composes every job of a batch to check that all of them can be composed before the
first one runs (Sweeper.validate_batch_is_legal), then its launcher composes each job again to run it
(`load_sweep_config` in BasicLauncher, and in the submitit/Slurm launcher before it pickles a job). For
sd3exp's config tree a composition is most of what a compile costs, so the checked composition is kept and
handed to the launcher: the whole batch is still checked before the first job starts, and each job runs the
config composed at that check (when the sweep started), not a second composition of the same files.

Jobs that differ only in values (`key=value` where the key is no config group: an lr x rank grid) differ only
after Hydra has composed their config groups, where it applies each value to the composed config
(ConfigLoaderImpl._apply_overrides_to_config). Such jobs share one composition of their groups, and each job is
a copy of it with its own values applied by that same Hydra function, its override list and override_dirname
set as Hydra sets them. A job with any other override (`+`, `++`, `~`, a package, a hydra override) or a config
that sets hydra.searchpath is composed whole, as Hydra composes it.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.hydra import Hydra
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.types import Override
from hydra.plugins.config_source import ConfigSource
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sd3exp.compose_cache import composed
from sd3exp.compose_parts import apply_values, groups_and_values

Key = Tuple[int, Tuple[str, ...]]
RUN_MODE = "hydra.mode=RUN"  # what Hydra adds to a run's overrides when no config sets hydra.mode


class ComposedOnce(ConfigLoader):
    """Hydra's config loader, keeping each job's composition from the batch check until its launch."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.checked: Dict[Key, DictConfig] = {}
        self.run: Optional[Tuple[Optional[str], Tuple[str, ...], DictConfig]] = None

    def __getstate__(self) -> Dict[str, Any]:
        """A launcher that pickles the loader for its jobs (submitit, Slurm) sends none of the kept configs:
        a job composed in another process composes itself there, as with Hydra's own sweeper."""
        return {"loader": self.loader, "checked": {}, "run": None}

    def compose_run(self, config_name: Optional[str], overrides: List[str]) -> DictConfig:
        """The run's composition (from the user's cache where it was made before: sd3exp/compose_cache.py),
        kept for the run's own load_configuration."""
        cfg = composed(self.loader, config_name, overrides)
        self.run = (config_name, tuple(overrides), cfg)
        return cfg

    def check(self, master_config: DictConfig, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job of the batch (raising the first error before any job runs) and keep each, in
        place of the previous batch's (a launcher that composed its jobs elsewhere took none of them)."""
        self.checked = {}
        groups_composed: Dict[Tuple[str, ...], DictConfig] = {}
        for overrides in batch:
            key = (id(master_config), tuple(overrides))
            self.checked[key] = self.compose_job(master_config, list(overrides), groups_composed)

    def compose_job(self, master_config: DictConfig, overrides: List[str],
                    groups_composed: Dict[Tuple[str, ...], DictConfig]) -> DictConfig:
        """The job's config: its config groups' composition (shared with the batch's other jobs of the same
        groups) with its values applied, or Hydra's whole composition where values_apart finds other overrides."""
        apart = values_apart(self.loader, master_config, overrides)
        if apart is None:
            return self.loader.load_sweep_config(master_config, overrides)
        groups, parsed, values = apart
        if groups not in groups_composed:
            groups_composed[groups] = self.loader.load_sweep_config(master_config, list(groups))
        return with_values(groups_composed[groups], master_config, parsed, values)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        kept = self.checked.pop((id(master_config), tuple(sweep_overrides)), None)
        return kept if kept is not None else self.loader.load_sweep_config(master_config, sweep_overrides)

    def load_configuration(self, config_name: Optional[str], overrides: List[str], run_mode: RunMode,
                           from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
        kept, self.run = self.run, None
        if kept and run_mode == RunMode.RUN and from_shell and validate_sweep_overrides and kept[0] == config_name:
            _, before, cfg = kept
            if tuple(overrides) == before:  # a config set hydra.mode=RUN: Hydra added nothing
                return cfg
            if tuple(overrides) == (*before, RUN_MODE):
                cfg.hydra.mode = RunMode.RUN
                cfg.hydra.overrides.hydra.append(RUN_MODE)
                return cfg
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


def values_apart(loader: ConfigLoader, master_config: DictConfig,
                 overrides: List[str]) -> Optional[Tuple[Tuple[str, ...], List[Override], List[Override]]]:
    """(the job's config group overrides, all its overrides parsed, its value overrides), in the job's order;
    None where the job has an override of another kind or its groups could come from a search path the config
    sets."""
    if master_config.hydra.searchpath:
        return None
    return groups_and_values(loader, overrides, hydra_values=())


def with_values(composed: DictConfig, master_config: DictConfig, parsed: List[Override],
                values: List[Override]) -> DictConfig:
    """A copy of the groups' composition with the job's values applied, its overrides recorded, as
    load_sweep_config does after composing."""
    cfg = apply_values(copy.deepcopy(composed), parsed, values)
    OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
    return cfg


HYDRAS_GET_MODE = Hydra.get_mode


def get_mode(self: Hydra, config_name: Optional[str], overrides: List[str]) -> Any:
    """Hydra.get_mode through a composition the run reuses; Hydra's own where the run composition fails
    (sweep values without -m: Hydra's run then names the problem)."""
    if not isinstance(self.config_loader, ComposedOnce):
        self.config_loader = ComposedOnce(self.config_loader)
    try:
        return self.config_loader.compose_run(config_name, overrides).hydra.mode
    except Exception:
        return HYDRAS_GET_MODE(self, config_name, overrides)


def compose_runs_once() -> None:
    Hydra.get_mode = get_mode  # type: ignore[method-assign]
