"""The caption store: `<captioner.out_dir>/<concept id>/<sha256 of the image>.json`.

One record per image content, written atomically as soon as its caption arrives
(an interrupted run keeps every caption received). A record holds the raw answer,
the training caption, the image's name when captioned, what was asked (backend,
model, system prompt, rendered prompt, generation settings: the request key) and
the post-processing settings. Same image bytes + same request key = reused; a
changed post-processing setting is re-applied to the raw answer without a request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from sd3exp.io import dumps_json, read_json, write_text

FORMAT = 1


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def request_key(request: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class Record:
    image: str
    sha256: str
    caption: str
    raw: str
    request: Dict[str, Any]
    request_key: str
    post: Dict[str, Any]
    tokens: Optional[int] = None
    format: int = FORMAT


class Store:
    def __init__(self, root: Path, concept_id: str) -> None:
        self.dir = Path(root) / concept_id

    def path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.json"

    def get(self, sha256: str) -> Optional[Record]:
        """The record for these image bytes; None when absent or unreadable (it is then captioned again)."""
        try:
            data = read_json(self.path(sha256))
            return Record(**data) if data.get("format") == FORMAT else None
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def put(self, record: Record) -> None:
        write_text(self.path(record.sha256), dumps_json(asdict(record)))
