"""Refuse a value of the wrong type for its field, on the command line or in the experiment file,
before Hydra composes.

Hydra would print `Error merging override training.max_steps=abc` and OmegaConf's ValidationError;
sd3exp names the field, the value, the type it takes and, for an override, the same command line
with a value that fits.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import shlex
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, ValidationError
from omegaconf._utils import get_yaml_loader
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from sd3exp.errors import ConfigError
from sd3exp.experiment import to_dict
from sd3exp.schema import ExperimentConfig

KINDS: Dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
LISTS: Dict[Any, str] = {int: "a list of integers", float: "a list of numbers", bool: "a list of booleans", str: "a list of strings"}
NODE_TYPES: Dict[type, type] = {IntegerNode: int, FloatNode: float, BooleanNode: bool}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _walk(key: str) -> Optional[Tuple[Any, Any, Tuple[Any, ...], List[str]]]:
    """(the dataclass holding `key`'s field, the field's type, its type arguments, the key from the field's
    name on), or None where the key is not a schema field."""
    cls: Any = ExperimentConfig
    rest = key.split(".")
    while rest[0] in _hints(cls):
        kind, args = _hints(cls)[rest[0]], typing.get_args(_hints(cls)[rest[0]])
        if dataclasses.is_dataclass(kind) and len(rest) > 1:
            cls, rest = kind, rest[1:]
        elif args and dataclasses.is_dataclass(args[0]) and len(rest) > 2 and rest[1].isdigit():
            cls, rest = args[0], rest[2:]  # concepts.0.repeats
        else:
            return cls, kind, args, rest
    return None


def _field(key: str) -> Optional[Tuple[DictConfig, str]]:
    """(a fresh node holding `key`'s schema field alone, the field's name), or None where the key is
    not a schema field (Hydra reports those) or is a config group. Only that field is built: the
    whole schema takes OmegaConf 75 ms."""
    found = _walk(key)
    if found is None:
        return None
    cls, kind, args, rest = found
    opens = typing.get_origin(kind) is dict and len(rest) == 2  # eval.select.at_least.clip_t
    if dataclasses.is_dataclass(kind) or (args and dataclasses.is_dataclass(args[0])) or (len(rest) > 1 and not opens):
        return None
    spec = copy.copy(next(f for f in dataclasses.fields(cls) if f.name == rest[0]))
    node = OmegaConf.structured(dataclasses.make_dataclass("Field", [(rest[0], kind, spec)]))
    return (node[rest[0]], rest[1]) if opens else (node, rest[0])


PLAIN: Dict[Any, Tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _plainly_fits(key: str, value: Any) -> bool:
    """Whether `value` is plainly of the type of `key`'s field (an int for an int or a float, a string for a
    string, None for an Optional), which OmegaConf takes as it is: no field node need be built."""
    found = _walk(key)
    if found is None or len(found[3]) != 1:
        return False
    kind, args = found[1], found[2]
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        if value is None:
            return True
        kind = next(a for a in args if a is not type(None)) if len(args) == 2 else None
    return type(value) in PLAIN.get(kind, ())


def _fits(key: str, value: Any) -> bool:
    """Whether OmegaConf takes `value` for `key` (on a fresh node: a failed try changes nothing); a
    key that is no schema field is Hydra's to judge."""
    if _plainly_fits(key, value):
        return True
    found = _field(key)
    if found is None:
        return True
    node, leaf = found
    try:
        node[leaf] = value
        return True
    except ValidationError:
        return False


def _as_override(value: Any) -> str:
    """`value` written as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{','.join(_as_override(v) for v in value)}]"
    return str(value)


def _kind(node: DictConfig, leaf: str) -> Tuple[str, Optional[Any]]:
    """What the field takes, in words, and a value of that type (None where unknown)."""
    field = node._get_node(leaf) if leaf in node else None
    if isinstance(field, ListConfig):
        return LISTS.get(field._metadata.element_type, "a list"), []
    kind = NODE_TYPES.get(type(field)) if field is not None else node._metadata.element_type
    return KINDS.get(kind, "a value of its type"), kind() if kind is not None and kind in KINDS else None


def misfit(key: str, value: Any) -> Optional[Tuple[str, List[Any]]]:
    """None where `value` fits `key`'s schema field (or `key` is none); else what the field takes, in
    words, and a value that fits (none where sd3exp knows none): the number `value` rounds to, the
    schema's default, or any value of the type."""
    if _fits(key, value):
        return None
    found = _field(key)
    if found is None:
        return None
    node, leaf = found
    kind, example = _kind(node, leaf)
    candidates: List[Any] = []
    try:
        candidates.append(round(float(value)))
    except (TypeError, ValueError):
        pass
    if leaf in node and not OmegaConf.is_missing(node, leaf):
        candidates.append(to_dict(node)[leaf])
    candidates.append(example)
    return kind, [c for c in candidates if _fits(key, c)][:1]


def override_values(override: Any) -> List[Any]:
    """The values an override sets: a sweep's every value, an interval's bounds; none for a glob (it
    picks config files, not values)."""
    from hydra.core.override_parser.types import Glob, IntervalSweep

    value = override.value()
    if isinstance(value, Glob):
        return []
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return list(override.sweep_iterator()) if override.is_sweep_override() else [value]


def check_overrides(argv: Sequence[str]) -> None:
    """ConfigError for the first override (`key=value`, a sweep's every value) of the wrong type; the
    fix is the same command line with a value that fits."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for i, arg in enumerate(argv):
        if arg.startswith(("-", "~")) or "=" not in arg or arg.lstrip("+").startswith("hydra."):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports its own grammar errors
            continue
        values = override_values(override)
        for bad in values:
            if (found := misfit(override.key_or_group, bad)) is None:
                continue
            kind, good = found
            fixed = dict.fromkeys(_as_override(good[0] if v == bad and good else v) for v in values)
            key = arg.split("=", 1)[0]
            line = [*argv[:i], f"{key}={','.join(fixed)}", *argv[i + 1:]]
            fix = (f"sd3exp {' '.join(shlex.quote(a) for a in line)}" if good
                   else f"give {key} {kind} (docs/experiment.md)")
            raise ConfigError(key, bad, f"{key} takes {kind}", fix)


def _leaves(data: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every scalar or list of scalars in a YAML mapping; list items as `.N`."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def check_experiment_file(argv: Sequence[str], conf_dir: Path) -> None:
    """ConfigError for the first value of the wrong type in the experiment file the command line
    names (`experiment=NAME`, looked up as Hydra does: the --config-dir folders, then conf/)."""
    from sd3exp.migrate import config_dirs_in

    name = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("experiment=")), None)
    files = [d / "experiment" / f"{name}.yaml" for d in [*config_dirs_in(argv), conf_dir]] if name else []
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        return
    try:  # OmegaConf's YAML loader (1e-4 is a number), as Hydra reads the file
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=get_yaml_loader())
    except (yaml.YAMLError, ValueError):
        return  # Hydra reports a file it cannot read
    for key, value in _leaves({k: v for k, v in data.items() if k != "defaults"} if isinstance(data, dict) else {}):
        if (found := misfit(key, value)) is None:
            continue
        kind, good = found
        *parents, leaf = key.split(".")
        where = f" under {'.'.join(parents)}" if parents else ""
        fix = f"write {leaf}: {_as_override(good[0])}{where}" if good else f"give {leaf}{where} {kind}"
        raise ConfigError(f"{path}: {key}", value, f"{key} takes {kind}", f"{fix} in {path}")
