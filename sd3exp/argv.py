"""The command line before Hydra reads it: bare words, --version and `~` in paths."""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path
from typing import Iterable, List

from sd3exp.errors import Sd3expError

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
