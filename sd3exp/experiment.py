"""The OmegaConf boundary: a composed config as the typed ExperimentConfig, or as a plain dict.

OmegaConf.to_object and OmegaConf.to_container are typed as returning any container; these two
functions are the one place where their results are checked and given their types.
"""

from __future__ import annotations

from typing import Any, Dict, cast

from omegaconf import Container, OmegaConf

from sd3exp.schema import ExperimentConfig


def to_experiment(cfg: Container) -> ExperimentConfig:
    """The composed (or merged) config, whose base is the schema, as an ExperimentConfig."""
    exp = OmegaConf.to_object(cfg)
    if not isinstance(exp, ExperimentConfig):
        raise TypeError(f"the config is not an ExperimentConfig but a {type(exp).__name__}")
    return exp


def to_dict(cfg: Container, resolve: bool = False) -> Dict[str, Any]:
    """A mapping config as a plain dict (OmegaConf.to_container)."""
    data = OmegaConf.to_container(cfg, resolve=resolve)
    if not isinstance(data, dict):
        raise TypeError(f"the config is not a mapping but a {type(data).__name__}")
    return cast(Dict[str, Any], data)  # a config's keys are strings
