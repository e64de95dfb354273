"""Where a Hugging Face model repo stands for this user: in the hub cache, downloadable, gated, missing.

Standalone worker, run by the trainer venv's python (huggingface_hub); sd3exp never imports it.
Usage: hub_check.py REPO_ID. Prints one JSON line: {repo, state, snapshot, detail}, state one of
cached | downloadable | gated | not_found | unauthorised | not_cached_offline | no_network. The hub
cache is read first (snapshot_download with local_files_only); the hub is asked only when the model
is not there and HF_HUB_OFFLINE is not set. The token is never printed.
"""

from __future__ import annotations

import json
import os
import sys

from huggingface_hub import auth_check, constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

MARKER = "model_index.json"  # a diffusers pipeline


def cached(repo_id: str) -> str | None:
    """The cached snapshot of repo_id (refs/main) holding a pipeline, or None."""
    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not in the cache
        return None
    return folder if os.path.isfile(os.path.join(folder, MARKER)) else None


def check(repo_id: str) -> dict:
    result = {"repo": repo_id, "state": "cached", "snapshot": cached(repo_id), "detail": ""}
    if result["snapshot"]:
        return result
    if constants.HF_HUB_OFFLINE:
        return {**result, "state": "not_cached_offline", "detail": "HF_HUB_OFFLINE is set"}
    try:
        auth_check(repo_id)
        return {**result, "state": "downloadable"}
    except GatedRepoError as exc:
        return {**result, "state": "gated", "detail": str(exc).splitlines()[0]}
    except RepositoryNotFoundError as exc:
        return {**result, "state": "not_found", "detail": str(exc).splitlines()[0]}
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        state = "unauthorised" if status in (401, 403) else "no_network"
        return {**result, "state": state, "detail": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy: reported, not raised
        return {**result, "state": "no_network", "detail": f"{type(exc).__name__}: {exc}"[:300]}


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])))
