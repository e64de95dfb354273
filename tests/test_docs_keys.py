"""Every experiment key of the schema is documented in docs/experiment.md."""

from __future__ import annotations

import re
from typing import Set

from sd3exp.added_keys import schema_keys
from sd3exp.project import ROOT


def documented_keys() -> Set[str]:
    """The keys of docs/experiment.md's table: a cell's first key is written in full, the ones after
    it may leave out its parent (`eval.steps`, `cfg`); rows under **concepts** are concepts.N.<key>."""
    keys, section = set(), ""
    for line in (ROOT / "docs" / "experiment.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| "):
            continue
        cell = line.split("|")[1].strip()
        header = re.fullmatch(r"\*\*(\w+)\*\*.*", cell)
        if header:
            section = header.group(1)
            continue
        names = re.findall(r"`([^`]+)`", cell)
        parent = names[0].rpartition(".")[0] if names else ""
        for name in names:
            key = name if "." in name or not parent else f"{parent}.{name}"
            keys.add(f"concepts.N.{key}" if section == "concepts" else key)
    return keys


def test_every_schema_key_is_documented():
    leaves, _ = schema_keys()
    missing = sorted(set(leaves) - documented_keys())
    assert missing == [], f"add these keys to docs/experiment.md: {missing}"
