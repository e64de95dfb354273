"""Refuse `+key=value` / `++key=value` overrides that add a key nothing reads.

Hydra suggests `+training.epoch=3` when `training.epoch=3` names no key; taken literally, that adds a
stray key which no stage reads but the run's identity records. Keys may be added only where the
schema leaves room for them: mappings such as eval.workflow_inputs and eval.select.at_least.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from sd3exp.errors import ConfigError
from sd3exp.schema import ExperimentConfig

Keys = Tuple[List[str], List[str]]  # (every leaf key, every mapping that takes new keys); lists as `.N`


def schema_keys(cls: type = ExperimentConfig, prefix: str = "") -> Keys:
    leaves: List[str] = []
    open_: List[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        args = typing.get_args(kind)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            sub = schema_keys(kind, key + ".")
        elif typing.get_origin(kind) is list and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            sub = schema_keys(args[0], key + ".N.")
        elif typing.get_origin(kind) is dict:
            sub = ([key], [key])
        else:
            sub = ([key], [])
        leaves += sub[0]
        open_ += sub[1]
    return leaves, open_


def _generic(key: str) -> str:
    """`concepts.0.trigger` -> `concepts.N.trigger`."""
    return ".".join("N" if part.isdigit() else part for part in key.split("."))


def _added(argv: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """(key, the override as typed) of each `+`/`++` override on the command line."""
    plus = [arg for arg in argv if arg.startswith("+") and "=" in arg]
    if not plus:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in plus:
        yield parser.parse_override(arg).key_or_group, arg


def check_added(argv: Sequence[str], conf_dir: Path) -> None:
    """ConfigError for the first `+key=value` that adds a key outside the schema's open mappings,
    naming the closest real key; config groups (`+experiment=...`) and hydra.* pass. The schema is
    walked only when the command line adds a key."""
    added = list(_added(argv))
    if not added:
        return
    from sd3exp.migrate import V1_RENAMES

    leaves, open_ = schema_keys()
    renamed = dict(V1_RENAMES)
    for key, arg in added:
        generic = _generic(key)
        if key.startswith("hydra.") or (conf_dir / key.split("@")[0]).is_dir():
            continue
        if any(generic.startswith(m + ".") for m in open_) or generic in leaves:
            continue  # Hydra itself says whether an existing key may be added
        close = [renamed[key]] if key in renamed else difflib.get_close_matches(generic, leaves, n=1)
        value = arg.split("=", 1)[1]
        index = next((part for part in key.split(".") if part.isdigit()), "0")
        fix = (f"write {close[0].replace('.N.', f'.{index}.')}={value} (no +)" if close
               else "see docs/experiment.md for the experiment keys")
        raise ConfigError(arg.split("=", 1)[0], value,
                          "adds a key that no stage reads (keys can be added only under "
                          f"{', '.join(open_)})", fix)
