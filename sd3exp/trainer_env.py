"""The SimpleTuner installation sd3exp trains with.

A managed one lives in a per-user cache keyed by version (like pre-commit's
environments), so every clone and CI run on a machine shares it; or the user
points `trainer.simpletuner` at their own venv or git checkout.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from sd3exp import console
from sd3exp.errors import TrainerError
from sd3exp.io import user_cache
from sd3exp.schema import ExperimentConfig

DEFAULT_VERSION = "4.10.1"
READY = ".sd3exp-ready.json"
PINS = {"4.10.1": [["torch==2.14.1", "torchvision==0.29.1"],
                   ["torch==2.14.1", "torchvision==0.29.1", "simpletuner==4.10.1", "transformers<5.23"]]}


@dataclass(frozen=True)
class TrainerEnv:
    """Where SimpleTuner is, and how to start it."""

    kind: str  # "managed", "venv" or "checkout"
    root: Path
    python: Path
    version: str

    @property
    def bin(self) -> Path:
        return self.python.parent

    def train_command(self) -> List[str]:
        if self.kind == "checkout" and not (self.bin / "simpletuner").exists():
            return ["bash", str(self.root / "train.sh")]
        return [str(self.bin / "simpletuner"), "train"]


def default_home() -> Path:
    if os.environ.get("SD3EXP_TRAINER_HOME"):
        return Path(os.environ["SD3EXP_TRAINER_HOME"])
    return user_cache() / "trainers"


def managed_root(version: str, home: Optional[Path]) -> Path:
    return (home or default_home()) / f"simpletuner-{version}"


def find_python312() -> str:
    """A working Python 3.12 interpreter (SimpleTuner 4.10 needs >= 3.12)."""
    candidates = [os.environ.get("SD3EXP_PYTHON312", ""), shutil.which("python3.12") or ""]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates += ["/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for c in filter(None, candidates):
        if subprocess.run([c, "-c", "import sys, venv; assert sys.version_info[:2] == (3, 12)"],
                          capture_output=True).returncode == 0:
            return c
    raise TrainerError("SimpleTuner 4.10.1 needs Python 3.12, and none was found. Fix: install python3.12 "
                       "(or set SD3EXP_PYTHON312=/path/to/python3.12), or set trainer.simpletuner to an "
                       "existing SimpleTuner venv or checkout.")


def _pip(python: Path, packages: List[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "--progress-bar", "on", *packages]
    console.info("+ " + " ".join(cmd))
    if subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr).returncode != 0:
        raise TrainerError(f"pip failed installing {' '.join(packages)} into {python.parent.parent}. "
                           "Fix: check the network/registry and disk space (about 8 GB), then run "
                           "`sd3exp setup-trainer` again; the half-built venv is replaced.")


def _install(root: Path, version: str) -> None:
    if version not in PINS:
        raise TrainerError(f"trainer.version={version!r}: sd3exp knows how to install {', '.join(PINS)} only. "
                           "Fix: use that version or point trainer.simpletuner at your own installation.")
    if root.exists():
        shutil.rmtree(root)
    console.info(f"installing SimpleTuner {version} into {root} (once per machine; about 8 GB, a few minutes)")
    subprocess.run([find_python312(), "-m", "venv", str(root)], check=True)
    python = root / "bin" / "python"
    _pip(python, ["--upgrade", "pip"])
    for step in PINS[version]:
        _pip(python, step)
    probe = _probe(python)
    (root / READY).write_text(json.dumps(probe, indent=2) + "\n")


def _probe(python: Path) -> dict:
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('simpletuner', 'torch', 'diffusers', 'transformers')}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise TrainerError(f"{python} cannot import SimpleTuner: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def ensure(version: str = DEFAULT_VERSION, home: Optional[Path] = None) -> TrainerEnv:
    """The managed trainer venv, installed first if needed (one installer at a time)."""
    root = managed_root(version, home)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / READY).is_file():
            _install(root, version)
    return TrainerEnv("managed", root, root / "bin" / "python", version)


def from_path(path: Path) -> TrainerEnv:
    """A user's own SimpleTuner: a venv (bin/python) or a git checkout (train.sh, usually with .venv)."""
    path = path.expanduser().resolve()
    if (path / "bin" / "python").exists():
        return TrainerEnv("venv", path, path / "bin" / "python", _probe(path / "bin" / "python")["simpletuner"])
    if (path / "train.sh").is_file():
        for venv in (path / ".venv", path / "venv"):
            if (venv / "bin" / "python").exists():
                return TrainerEnv("checkout", path, venv / "bin" / "python", _probe(venv / "bin" / "python")["simpletuner"])
        raise TrainerError(f"trainer.simpletuner={path}: a SimpleTuner checkout without a .venv. Fix: create its "
                           "venv as its README says, or leave trainer.simpletuner unset to use the managed one.")
    raise TrainerError(f"trainer.simpletuner={path}: neither a venv (bin/python) nor a SimpleTuner checkout "
                       "(train.sh). Fix: point it at one of those, or leave it unset (`sd3exp setup-trainer`).")


def locate(simpletuner: Optional[str], version: str, home: Optional[str]) -> TrainerEnv:
    """The configured trainer; a missing managed one is an error naming the set-up command."""
    if simpletuner:
        return from_path(Path(simpletuner))
    root = managed_root(version, Path(home) if home else None)
    if not (root / READY).is_file():
        raise TrainerError(f"SimpleTuner {version} is not installed at {root}. Fix: run `make trainer` "
                           "(or `sd3exp setup-trainer`), or set trainer.simpletuner=/path/to/your/SimpleTuner.")
    return TrainerEnv("managed", root, root / "bin" / "python", version)


def trainer_for(cfg: ExperimentConfig) -> TrainerEnv:
    t = cfg.trainer
    env = locate(t.simpletuner, t.version, t.home)
    console.info(f"trainer: SimpleTuner {env.version} ({env.kind}) at {env.root}")
    return env
