"""A run's composition kept in the user's cache, found again by a digest of everything Hydra composed it from.

Composing sd3exp's config tree is most of what a compile costs (about 110 ms of Hydra's time); its pickle loads
in about 2 ms. Hydra composes a run from: the config name and the overrides; the files of every entry of the
config search path (a file:// folder or a pkg:// package: every file by content, linked folders followed, so a
new, removed or edited config is seen; a folder of more than MOST_FILES files is not digested and its runs are
composed each time); the ConfigStore's nodes (structured://, sd3exp's schema among them, by their pickle); the
working directory (hydra.runtime.cwd); the job's name; the two variables that make Hydra's warnings errors;
Hydra's version base; and the Hydra, OmegaConf and Python versions. The key is a digest of all of these, so a change to any of them composes afresh. A composition is kept
only where it read nothing else (none that sets hydra.searchpath, folders named inside the config, or
hydra.job.env_copy, values from the environment) and where the key is the same after composing (no file saved
meanwhile). A missing, broken or foreign cache file composes as Hydra does; a cache that cannot be written only
makes no entry. The KEEP entries last used are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import hydra
import omegaconf
from hydra import version
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobRuntime
from hydra.types import RunMode
from omegaconf import DictConfig

from sd3exp.compose_parts import apply_values, groups_and_values
from sd3exp.errors import DiskFullError
from sd3exp.io import user_cache, write_bytes

KEEP = 64  # entries kept: the least recently used beyond are removed when one is added
HYDRAS_VARIABLES = ("SELF_WARNING_AS_ERROR", "HYDRA_DEPRECATION_WARNINGS_AS_ERRORS")  # read while composing
MOST_FILES = 2000  # a search path folder with more files than this is not digested (the run is composed)


class TooLarge(Exception):
    """A folder of the search path holds more than MOST_FILES files."""


def cache_dir() -> Path:
    return user_cache() / "composed"


def _files(folder: Path) -> Iterator[Path]:
    """Every file under `folder` in a fixed order, linked folders followed (each real folder once),
    bytecode caches left out; TooLarge past MOST_FILES."""
    seen, count = set(), 0
    for root, dirs, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.realpath(os.path.join(root, d)) not in seen)
        for name in sorted(names):
            count += 1
            if count > MOST_FILES:
                raise TooLarge(folder)
            yield Path(root, name)


def _folders(path: str) -> Optional[List[Path]]:
    """The folders of a search path entry (file:// or a bare path, pkg://); None for structured:// (the
    ConfigStore) and for a scheme this module does not know."""
    scheme, _, rest = path.rpartition("://")
    if scheme in ("", "file"):
        return [Path(rest)]
    if scheme == "pkg":
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(rest.replace("/", "."))
            if spec is not None and spec.submodule_search_locations is not None:
                return [Path(p) for p in spec.submodule_search_locations]
        return []  # a package that is not there: Hydra skips it too
    return None


def cache_key(loader: ConfigLoader, config_name: Optional[str], overrides: List[str]) -> Optional[str]:
    """The digest of what Hydra composes this run from; None where an entry of the search path is of a
    kind this module cannot digest or too large (composed by Hydra, not kept)."""
    digest = hashlib.sha256(json.dumps([
        sys.version, hydra.__version__, omegaconf.__version__, str(version.getbase()),
        config_name, overrides, os.getcwd(), JobRuntime.instance().get("name"),
        *(os.environ.get(name) for name in HYDRAS_VARIABLES)]).encode())
    for entry in loader.get_search_path().get_path():
        digest.update(json.dumps([entry.provider, entry.path]).encode())
        if entry.path == "structured://":
            digest.update(hashlib.sha256(pickle.dumps(ConfigStore.instance().repo)).digest())
            continue
        folders = _folders(entry.path)
        if folders is None:
            return None
        try:
            for folder in folders:
                for path in _files(folder):
                    digest.update(json.dumps(str(path.relative_to(folder))).encode())
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
        except TooLarge:
            return None
    return digest.hexdigest()


def _key(loader: ConfigLoader, config_name: Optional[str], overrides: List[str]) -> Optional[str]:
    try:
        return cache_key(loader, config_name, overrides)
    except OSError:  # a file of the config tree could not be read: Hydra says what is wrong
        return None


def keepable(cfg: DictConfig) -> bool:
    """Composed from nothing but what cache_key digests."""
    return not cfg.hydra.searchpath and not cfg.hydra.job.env_copy


def composed(loader: ConfigLoader, config_name: Optional[str], overrides: List[str]) -> DictConfig:
    """Hydra's composition of the run: its config groups' composition (from the user's cache where one was
    made from the same inputs) with its values applied as Hydra applies them (compose_parts.apply_values);
    the whole command line's composition, cached the same way, where it has overrides of other kinds."""
    apart = groups_and_values(loader, overrides)
    if apart is None:
        return cached(loader, config_name, overrides)
    groups, parsed, values = apart
    ConfigLoaderImpl.validate_sweep_overrides_legal(parsed, RunMode.RUN, from_shell=True)  # a multirun's: composed
    cfg = cached(loader, config_name, list(groups))                                        # by Hydra, as before
    apply_values(cfg, parsed, values)
    cfg.hydra.overrides.hydra = [override.input_line for override in parsed if override.is_hydra_override()]
    return cfg


def cached(loader: ConfigLoader, config_name: Optional[str], overrides: List[str]) -> DictConfig:
    """loader.load_configuration of a run, from the user's cache where it was made from the same inputs."""
    key = _key(loader, config_name, overrides)
    path = cache_dir() / f"{key}.pickle" if key else None
    if path is not None:
        with contextlib.suppress(Exception):  # missing, broken or foreign: composed again
            cfg = pickle.loads(path.read_bytes())
            if isinstance(cfg, DictConfig):
                os.utime(path)  # used now: kept over the entries used less recently
                return cfg
    cfg = loader.load_configuration(config_name, overrides, RunMode.RUN)
    if path is not None and keepable(cfg) and _key(loader, config_name, overrides) == key:  # nothing changed meanwhile
        keep(path, pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
    return cfg


def keep(path: Path, data: bytes) -> None:
    """The entry written (atomically), the least recently used beyond KEEP removed; nothing where the cache
    is unwritable."""
    with contextlib.suppress(OSError, DiskFullError):
        write_bytes(path, data, sync=False)
        entries = sorted(path.parent.glob("*.pickle"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
