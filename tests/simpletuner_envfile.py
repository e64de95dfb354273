"""A line-for-line model of how SimpleTuner 4.10.1 reads config.env (env_file.py
parse_env_file + loader.load_env_variables + env_file.load_env_config), used to
check our quoting without the trainer venv. test_envfile also runs the real one."""

from __future__ import annotations

import re
from typing import Dict, Optional

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def parse_env_file(text: str) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or line == "":
            continue
        if line.startswith("export "):
            line = line[7:]
        if "+=" in line:
            key, value = line.split("+=", 1)
            out.setdefault(key.strip(), []).extend(value.strip('"').strip("'").strip().split())
        elif "=" in line:
            key, value = line.split("=", 1)
            value = value.strip()
            if (value.startswith('"') and value.endswith('"')) or (value.startswith("'") and value.endswith("'")):
                value = value[1:-1]
            out[key.strip()] = value.split() if value else []
    return out


def as_argument(text: str, key: str, environ: Dict[str, str]) -> Optional[str]:
    """The value SimpleTuner hands to its argument parser for `key` (None: dropped or flag)."""
    raw = parse_env_file(text).get(key)
    if raw is None:
        return None
    value = " ".join(raw)
    if not value:
        return None
    for q in ("'", '"'):
        if value.startswith(q) and value.endswith(q):
            value = value[1:-1]
    value = _PLACEHOLDER.sub(lambda m: environ.get(m.group(1)[4:], "") if m.group(1).startswith("env:") else m.group(0), value)
    return None if value.lower() in ("true", "false") else value
