"""Older experiment files keep loading: one migration per schema version step (OneTrainer style).

Hydra's structured-config merge rejects unknown keys before sd3exp's code runs,
so migration happens before Hydra composes: when an experiment file (in conf/
or a `--config-dir`) has an older `schema_version`, the migrated copies go into
a generated config directory that becomes Hydra's primary config path
(`--config-path`). It holds only those files and a copy of config.yaml whose
`hydra.searchpath` puts the real conf/ behind it, so every other file is read
where it is and experiment names (hence run folders) do not change. The folder
is content-addressed under the user cache ($XDG_CACHE_HOME/sd3exp), so Slurm
jobs that compose again later still find it. A file without schema_version is
current.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from sd3exp.errors import ConfigError
from sd3exp.experiment import to_dict
from sd3exp.io import atomic_dir, user_cache
from sd3exp.schema import SCHEMA_VERSION

Migration = Callable[[dict], List[str]]  # edits the experiment mapping in place, returns what changed

_VERSION = re.compile(r"^schema_version:\s*(\S+)\s*$", re.MULTILINE)
_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")

V1_RENAMES = [("training.train_batch_size", "training.batch_size"),
              ("training.num_train_epochs", "training.epochs"),
              ("training.max_train_steps", "training.max_steps"),
              ("optimizer.learning_rate", "optimizer.lr"),
              ("checkpointing.checkpoints_total_limit", "checkpointing.keep")]
V1_CONCEPT_RENAMES = [("num_repeats", "repeats"), ("instance_prompt", "trigger")]


def move(data: dict, old: str, new: str) -> bool:
    """Move the value at dotted path `old` to `new`; False when `old` is absent."""
    *parents, leaf = old.split(".")
    node: Any = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return False
    value = node.pop(leaf)
    *parents, leaf = new.split(".")
    target = data
    for key in parents:
        target = target.setdefault(key, {})
    if leaf in target:
        raise ConfigError(old, value, f"the file sets both {old} (schema 1) and {new}", f"keep only {new}")
    target[leaf] = value
    return True


def v1_to_v2(data: dict) -> List[str]:
    """Schema 2 uses sd3exp's own names where schema 1 used SimpleTuner's argument names."""
    notes = [f"{old} -> {new}" for old, new in V1_RENAMES if move(data, old, new)]
    for i, concept in enumerate(data.get("concepts") or []):
        notes += [f"concepts[{i}].{old} -> {new}" for old, new in V1_CONCEPT_RENAMES if move(concept, old, new)]
    return notes


MIGRATIONS: Dict[int, Migration] = {1: v1_to_v2}  # version N -> N + 1


def file_version(text: str) -> int:
    m = _VERSION.search(text)
    if not m:
        return SCHEMA_VERSION
    if not m.group(1).isdigit():
        raise ConfigError("schema_version", m.group(1), "is not a whole number", "write e.g. schema_version: 2")
    return int(m.group(1))


def check_version(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{path}: schema_version", version,
                          f"the file was written for a newer sd3exp (this one reads up to {SCHEMA_VERSION})",
                          "upgrade sd3exp, or use an experiment file written for this version")
    if version != SCHEMA_VERSION and version not in MIGRATIONS:
        raise ConfigError(f"{path}: schema_version", version, f"no migration from it (oldest: {min(MIGRATIONS)})",
                          f"rewrite the file for schema_version {SCHEMA_VERSION}")


def migrate_text(path: Path, text: str) -> Tuple[str, List[str]]:
    """The file migrated to SCHEMA_VERSION, and what changed (leading comment lines are kept)."""
    version = file_version(text)
    check_version(path, version)
    data = to_dict(OmegaConf.create(text))
    notes = []
    for step in range(version, SCHEMA_VERSION):
        notes += MIGRATIONS[step](data)
    data["schema_version"] = SCHEMA_VERSION
    return _header(text) + OmegaConf.to_yaml(OmegaConf.create(data)), notes


def _header(text: str) -> str:
    """The leading comment block (it carries `# @package _global_`)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line + "\n")
    return "".join(lines)


def experiment_files(config_dirs: Sequence[Path]) -> List[Tuple[Path, Path]]:
    """(config dir, file) for every experiment file, first config dir first."""
    return [(d, p) for d in config_dirs for p in sorted((d / "experiment").rglob("*.yaml"))]


def outdated(config_dirs: Sequence[Path]) -> List[Tuple[Path, Path]]:
    return [(d, p) for d, p in experiment_files(config_dirs) if file_version(p.read_text()) != SCHEMA_VERSION]


def cache_root() -> Path:
    return user_cache() / "migrated-conf"


def generated_files(conf_dir: Path, old: List[Tuple[Path, Path]]) -> Dict[str, str]:
    """config.yaml (searching conf_dir behind the generated folder) + the migrated experiment files."""
    config = OmegaConf.load(conf_dir / "config.yaml")
    searchpath = [f"file://{conf_dir.resolve()}", *OmegaConf.select(config, "hydra.searchpath", default=[])]
    OmegaConf.update(config, "hydra.searchpath", searchpath, force_add=True)
    files = {"config.yaml": "# Generated by sd3exp.migrate; edit conf/, not this.\n" + OmegaConf.to_yaml(config)}
    for d, path in old:
        original = path.read_text()
        text, notes = migrate_text(path, original)
        print(f"sd3exp: {path} uses schema_version {file_version(original)}; loaded through a migration to "
              f"{SCHEMA_VERSION} ({'; '.join(notes) or 'no key changed'}). Update the file to silence this notice.",
              file=sys.stderr)
        files[path.relative_to(d).as_posix()] = text
    return files


def materialize(files: Dict[str, str]) -> Path:
    """Write `files` once into a content-addressed folder of the cache."""
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    dest = cache_root() / digest
    if dest.is_dir():
        return dest
    with atomic_dir(dest, replace=False) as tmp:  # another process may make the same folder first
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
    return dest


def migrated_config_dir(conf_dir: Path, extra_dirs: Sequence[Path] = ()) -> Path:
    """`conf_dir` when every experiment file is current, else the generated primary config folder."""
    old = outdated([conf_dir, *extra_dirs])
    return materialize(generated_files(conf_dir, old)) if old else conf_dir


def config_dirs_in(argv: Sequence[str]) -> List[Path]:
    """The `--config-dir` / `-cd` folders of a Hydra command line."""
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in _CONFIG_DIR_FLAGS:
            out.append(Path(value if eq else argv[i + 1] if i + 1 < len(argv) else "."))
    return out


def prepare_argv(argv: List[str], conf_dir: Path) -> List[str]:
    """The command line, with `--config-path <generated>` when an experiment file needs migrating."""
    primary = migrated_config_dir(conf_dir, config_dirs_in(argv[1:]))
    return argv if primary == conf_dir else [argv[0], "--config-path", str(primary), *argv[1:]]
