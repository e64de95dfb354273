"""A composition in two parts, as Hydra makes it: the config groups composed, then the values applied.

Hydra composes the config groups a command line chooses, then applies its values (`key=value` where the key is
no config group, or a dict) to the composed config (ConfigLoaderImpl._apply_overrides_to_config) and records
the overrides (hydra.overrides, hydra.job.override_dirname). Command lines that differ only in values can so
share one composition of their groups: a sweep's jobs (sd3exp/compose_once.py), and runs read back from the
user's cache (sd3exp/compose_cache.py).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig

# Hydra keys whose values a run's composition takes like any value: none of them is read while composing
# or set after the values are applied (hydra.runtime, hydra.job.name, env_copy, override_dirname are).
HYDRA_VALUES = ("hydra.run.", "hydra.sweep.", "hydra.launcher.", "hydra.sweeper.", "hydra.callbacks.",
                "hydra.job.chdir", "hydra.output_subdir", "hydra.verbose", "hydra.mode")


def groups_and_values(loader: ConfigLoader, overrides: List[str], hydra_values: Tuple[str, ...] = HYDRA_VALUES
                      ) -> Optional[Tuple[Tuple[str, ...], List[Override], List[Override]]]:
    """(the config group overrides, all overrides parsed, the value overrides), in the given order (a dict or
    a key that is no config group is a value, as defaults_list.Overrides sorts them); None where an override is
    of another kind (`+`, `++`, `~`, a package) or sets a hydra key that `hydra_values` does not start."""
    repository = getattr(loader, "repository", None)
    if repository is None:
        return None
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups: List[str] = []
    values: List[Override] = []
    for override in parsed:
        if override.type != OverrideType.CHANGE or override.package is not None:
            return None
        if isinstance(override.value(), dict) or not repository.group_exists(override.key_or_group):
            if override.is_hydra_override() and not override.key_or_group.startswith(hydra_values):
                return None
            values.append(override)
        else:
            groups.append(str(override.input_line))
    return tuple(groups), parsed, values


def apply_values(cfg: DictConfig, parsed: List[Override], values: List[Override]) -> DictConfig:
    """The values applied to a composition of the groups alone and the overrides recorded (hydra.overrides.task,
    override_dirname), as ConfigLoaderImpl._load_configuration_impl does after composing."""
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    task = [override for override in parsed if not override.is_hydra_override()]
    cfg.hydra.overrides.task = [override.input_line for override in task]
    dirname = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(overrides=task, exclude_keys=list(dirname.exclude_keys),
                                                           item_sep=dirname.item_sep, kv_sep=dirname.kv_sep)
    return cfg
