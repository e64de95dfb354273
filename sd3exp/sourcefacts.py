"""What sd3exp learnt about a source folder's images, kept so an unchanged image is read only once.

One file per source folder, `$XDG_CACHE_HOME/sd3exp/sources/<sha256 of its path>.json` (never in the
user's folder): {"images": {image name: {"stamp": "<size>:<mtime_ns>", "sha256": ..., "audit": ...,
"header": ...}}, "digests": {inputs digest: cache-key digest}}. An image whose size or mtime differs
from its stamp gets a new entry (all its facts are computed again). The file is only a speed-up: when
it is missing, unreadable or lost to a concurrent write, the facts are computed again. The cache key,
the plan and the audit share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict

from sd3exp.caption.store import file_sha256
from sd3exp.io import read_json, user_cache, write_json

KEEP = 16


def _cache_file(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:32]
    return user_cache() / "sources" / f"{key}.json"


class SourceFacts:
    """The facts of one folder's images; `save()` writes what changed."""

    def __init__(self, folder: Path) -> None:
        self.path = _cache_file(folder)
        try:
            data = read_json(self.path)
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        images, digests = data.get("images"), data.get("digests")
        self.entries: Dict[str, Dict[str, Any]] = images if isinstance(images, dict) else {}
        self.digests: Dict[str, str] = digests if isinstance(digests, dict) else {}
        self.changed = False

    def entry(self, image: Path) -> Dict[str, Any]:
        """The image's entry, emptied when the file changed (its stamp is read before its content);
        a throwaway one when it cannot be stat'ed (the caller's read reports why)."""
        try:
            st = image.stat()
        except OSError:
            return {}
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        found = self.entries.get(image.name)
        if isinstance(found, dict) and found.get("stamp") == stamp:
            return found
        self.entries[image.name] = {"stamp": stamp}
        self.changed = True
        return self.entries[image.name]

    def fact(self, image: Path, key: str, compute: Callable[[], Any]) -> Any:
        """The image's fact `key`: kept, or computed and kept (an exception keeps nothing)."""
        entry = self.entry(image)
        if key not in entry:
            entry[key] = compute()
            self.changed = True
        return entry[key]

    def sha256(self, image: Path) -> str:
        return self.fact(image, "sha256", lambda: file_sha256(image))

    def keep_digest(self, inputs: str, digest: str) -> None:
        """Remember the concept digest of these inputs (sd3exp.prepare.inputs_digest); the last KEEP are kept."""
        self.digests = {**{k: v for k, v in self.digests.items() if k != inputs}, inputs: digest}
        self.digests = dict(list(self.digests.items())[-KEEP:])
        self.changed = True

    def save(self) -> None:
        if self.changed:
            try:
                write_json(self.path, {"images": self.entries, "digests": self.digests})
            except OSError:
                pass  # only a speed-up: the facts were computed
            self.changed = False
