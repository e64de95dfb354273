"""The command line before Hydra reads it: bare words, --version and `~` in paths."""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path
from typing import Iterable, List, Sequence

from sd3exp.errors import ConfigError, Sd3expError

PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.")  # keys whose value is a folder


class UsageError(Sd3expError):
    """The command line is not a subcommand, an override or a flag."""


def unknown_word(word: str, rest: List[str], subcommands: Iterable[str], conf_dir: Path) -> UsageError:
    """The error for a bare word that is neither a subcommand nor an override (Hydra would report
    its grammar instead), suggesting the closest subcommand or the experiment of that name, with the
    rest of the command line (`rest`)."""
    tail = "".join(f" {shlex.quote(a)}" for a in rest)
    if (conf_dir / "experiment" / f"{word}.yaml").is_file():
        return UsageError(f"'{word}' is not a subcommand. Fix: sd3exp experiment={word}{tail}")
    close = difflib.get_close_matches(word, list(subcommands), n=1)
    fix = f"sd3exp {close[0]}{tail}" if close else "sd3exp --help (it lists the subcommands and experiments)"
    return UsageError(f"'{word}' is not a subcommand (they are {', '.join(subcommands)}) nor an override "
                      f"(key=value). Fix: {fix}")


def group_options(group: str, dirs: Sequence[Path]) -> List[str]:
    """The config files of a config group in `dirs` (its sub-folders' as `sub/name`), without .yaml."""
    return sorted({p.relative_to(d / group).with_suffix("").as_posix() for d in dirs if (d / group).is_dir()
                   for p in (d / group).rglob("*.yaml")})


def check_choices(argv: Sequence[str], conf_dir: Path) -> None:
    """ConfigError for an override that picks a config file its group does not have (`model=sd3_mediun`,
    a sweep's every value), naming the group's files and the same command line with the closest one.
    Left to Hydra where its search path is extended (hydra.searchpath), which this does not follow."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sd3exp.field_types import override_values
    from sd3exp.migrate import config_dirs_in

    dirs = [*config_dirs_in(argv), conf_dir]
    if any("searchpath" in a for a in argv) or any("searchpath" in p.read_text(errors="replace")
                                                   for d in dirs for p in d.glob("local/*.yaml")):
        return
    parser = OverridesParser.create()
    for i, arg in enumerate(argv):
        if arg.startswith(("-", "~", "hydra")) or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports its own grammar errors
            continue
        group, options = override.key_or_group, group_options(override.key_or_group, dirs)
        values = [v for v in override_values(override) if v is not None]
        if override.package is not None or not options:
            continue
        key = arg.split("=", 1)[0]
        if override.value() is None:  # group=null: Hydra fails with a traceback; ~group is how it drops a group's choice
            fix = "sd3exp " + " ".join(shlex.quote(a) for a in [*argv[:i], f"~{key.lstrip('+')}", *argv[i + 1:]])
            raise ConfigError(key, arg.split("=", 1)[1], f"Hydra does not take null for the config group {group}; "
                              f"~{key.lstrip('+')} drops its choice", fix)
        if not values:  # a glob: Hydra expands it
            continue
        for bad in (v for v in values if str(v) not in options):
            close = difflib.get_close_matches(str(bad), options, n=1, cutoff=0)[0]
            picked = ",".join(dict.fromkeys(close if v == bad else str(v) for v in values))
            fix = "sd3exp " + " ".join(shlex.quote(a) for a in [*argv[:i], f"{key}={picked}", *argv[i + 1:]])
            raise ConfigError(key, bad, f"{group} has no config file {bad}.yaml (it has {', '.join(options)})", fix)


def versions() -> str:
    """sd3exp's version, the SimpleTuner version it trains with (and whether it is installed), Hydra's."""
    import hydra

    from sd3exp import __version__, trainer_env

    root = trainer_env.managed_root(trainer_env.DEFAULT_VERSION, None)
    where = (f"installed at {root}" if (root / trainer_env.READY).is_file()
             else "not installed: sd3exp setup-trainer")
    return (f"sd3exp {__version__}\nSimpleTuner {trainer_env.DEFAULT_VERSION} ({where})\n"
            f"Hydra {hydra.__version__}")


def expand_home(argv: List[str]) -> List[str]:
    """`hydra.run.dir=~/x` (quoted, so the shell left `~` alone) with `~` expanded, for every folder key:
    otherwise Hydra makes a folder named `~` in the current one."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value.startswith("~") and key.lstrip("+").startswith(PATH_KEYS):
            arg = f"{key}={os.path.expanduser(value)}"
        out.append(arg)
    return out
