"""Write config.env values that mean the same to bash and to SimpleTuner.

config.env is read by `source` in train.sh and by SimpleTuner's own line parser
(helpers/configuration/env_file.py), which strips one pair of quotes, splits on
whitespace and re-joins with single spaces, treats any line with `+=` as an
append, expands `{env:NAME}`, and turns values `true`/`false` into a flag or
nothing. A value is written only if both readers get exactly the same string;
anything else is refused with the field's name.
"""

from __future__ import annotations

import re
from typing import Union

from sd3exp.errors import UnsafeValueError

Scalar = Union[str, int, float, bool]

_BARE = re.compile(r"[A-Za-z0-9_./:,@%+-]+")
_PLACEHOLDER = re.compile(r"\{[^{}]+\}")
_FORBIDDEN = {'"': "a double quote", "'": "a single quote", "$": "a dollar sign", "`": "a backtick",
              "\\": "a backslash"}
_FIX = ("rephrase the value, or set trainer.config_backend=json to carry it in config.json, "
        "where JSON escaping is exact")


def _problem(value: str) -> str:
    """Why `value` cannot be written into config.env, or '' when it can."""
    for char, name in _FORBIDDEN.items():
        if char in value:
            return f"it contains {name}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a newline, tab or control character"
    if "+=" in value:
        return "it contains '+=', which SimpleTuner's parser reads as an append"
    if _PLACEHOLDER.search(value):
        return "it contains a {...} placeholder, which SimpleTuner expands"
    if value != " ".join(value.split()):
        return "it has leading, trailing or repeated spaces, which SimpleTuner's parser collapses"
    return ""


def check_text(field: str, value: str) -> None:
    """Raise UnsafeValueError unless a free-text value survives both readers."""
    problem = _problem(value)
    if problem:
        raise UnsafeValueError(field, value, f"cannot be written safely into config.env: {problem}", _FIX)


def encode(field: str, value: Scalar, *, flag: bool = False) -> str:
    """The right-hand side of `KEY=...` for `value`; `flag` marks boolean arguments."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    check_text(field, text)
    if not flag and text.lower() in ("true", "false"):
        raise UnsafeValueError(field, value, "SimpleTuner turns the text true/false into a flag",
                               "rephrase the value")
    if text == "":
        raise UnsafeValueError(field, value, "an empty value is dropped by SimpleTuner", "leave the key out")
    return text if _BARE.fullmatch(text) else f"'{text}'"
