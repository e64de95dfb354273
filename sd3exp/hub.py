"""The user's Hugging Face login and hub cache, and where a model repo stands before it is used.

Paths follow huggingface_hub's own rules (constants.py) without importing it: this side has no
huggingface_hub; the hub itself is asked through sd3exp/workers/hub_check.py in the trainer venv.
A token's value is never read, printed or written: only where it was found.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from sd3exp.errors import ConfigError
from sd3exp.project import WORKERS

WORKER = WORKERS / "hub_check.py"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TRUE = ("1", "ON", "YES", "TRUE")


def hf_home(env: Mapping[str, str] = os.environ) -> Path:
    """$HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface."""
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface"


def hub_cache(env: Mapping[str, str] = os.environ) -> Path:
    """$HF_HUB_CACHE (or the older HUGGINGFACE_HUB_CACHE), else <HF_HOME>/hub."""
    return Path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or hf_home(env) / "hub").expanduser()


def token_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where `hf auth login` keeps the token: $HF_TOKEN_PATH, else <HF_HOME>/token."""
    return Path(env.get("HF_TOKEN_PATH") or hf_home(env) / "token").expanduser()


def token_source(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """Where a token was found (the HF_TOKEN variable or the token file), None without one."""
    if env.get("HF_TOKEN", "").strip():
        return "the HF_TOKEN environment variable"
    path = token_path(env)
    try:
        return str(path) if path.read_text(encoding="utf-8").strip() else None
    except OSError:
        return None


def offline(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("HF_HUB_OFFLINE", "").upper() in TRUE


def is_repo_id(value: str) -> bool:
    """`org/name` that is not a local folder."""
    return bool(_REPO_ID.match(value)) and not Path(value).expanduser().exists()


def user_hub_env(env: Mapping[str, str] = os.environ) -> dict:
    """What the trainer needs of the user's login and cache while its HF_HOME is run-private:
    the hub cache and the token file (HF_TOKEN itself passes through as it is)."""
    return {"HF_HUB_CACHE": str(hub_cache(env)), "HF_TOKEN_PATH": str(token_path(env))}


@dataclass(frozen=True)
class ModelState:
    """Where a base model stands: local | cached | downloadable | gated | not_found | unauthorised |
    not_cached_offline | no_network."""

    value: str
    state: str
    folder: Optional[str] = None
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.state in ("local", "cached", "downloadable")

    def line(self) -> str:
        """One line for a person (never the token's value)."""
        where = {"local": f"a local folder ({self.folder})", "cached": f"in the Hugging Face cache ({self.folder})",
                 "downloadable": "not in the Hugging Face cache; the hub will send it (the first run downloads it)"}
        return where.get(self.state, f"{self.state.replace('_', ' ')}{': ' + self.detail if self.detail else ''}")


def model_state(value: str, python: Path) -> ModelState:
    """Where model.path stands: a local folder, else the repo id asked of the hub cache (and the
    hub only when it is not cached and HF_HUB_OFFLINE is not set) through the trainer venv."""
    folder = Path(value).expanduser()
    if folder.is_dir():
        return ModelState(value, "local", str(folder.resolve()))
    if not is_repo_id(value):
        return ModelState(value, "not_found", detail="no such folder, and not a Hugging Face repo id (org/name)")
    out = subprocess.run([str(python), str(WORKER), value], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"})
    try:
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return ModelState(value, "no_network", detail=f"the hub check failed: {tail}")
    return ModelState(value, data["state"], data.get("snapshot"), data.get("detail", ""))


def model_fix(state: ModelState, field: str = "model.path") -> str:
    """The fix for a model that cannot be used, with the token's state (never its value)."""
    source = token_source()
    token = f"a token was found in {source}" if source else f"no token was found (HF_TOKEN unset, no {token_path()})"
    page = f"https://huggingface.co/{state.value}"
    login = "`hf auth login` (or export HF_TOKEN=<your token>)"
    local = f"or train from a local copy: {field}=/path/to/model-folder"
    if state.state == "gated":
        return f"{token}; accept the licence on {page} with that account, then {login}; {local}"
    if state.state in ("not_found", "unauthorised"):
        return (f"{token}; check the repo id ({page}); a private or gated repo needs {login} with an account "
                f"that may read it; {local}")
    if state.state == "not_cached_offline":
        return f"HF_HUB_OFFLINE is set and {token}: download it once with `hf download {state.value}`; {local}"
    return f"{token}; check the network, or download it once with `hf download {state.value}`; {local}"


def require_model(value: str, python: Path, field: str = "model.path") -> ModelState:
    """The model's state; a ConfigError naming the model, the token's state and the fix when it cannot be used."""
    state = model_state(value, python)
    if not state.usable:
        raise ConfigError(field, value, f"the model cannot be used: {state.line()}", model_fix(state, field))
    return state
