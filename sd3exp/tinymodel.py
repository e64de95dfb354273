"""Build the tiny random SD3 pipeline with the trainer venv's python."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import TrainerError

WORKER = Path(__file__).parent / "workers" / "build_tiny_sd3.py"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def build_tiny_model(out: Path, python: Path, seed: int) -> Path:
    """Build (or find already built) the tiny SD3 folder at out; return its path."""
    if not Path(python).is_file():
        raise TrainerError(f"trainer python {python} does not exist; install the trainer venv first")
    out = Path(out).resolve()
    try:
        proc = subprocess.run(
            [str(python), str(WORKER), str(out), "--seed", str(seed)],
            env={**os.environ, **OFFLINE_ENV},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as err:
        raise TrainerError(f"building the tiny SD3 model at {out} took over {err.timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise TrainerError(f"building the tiny SD3 model at {out} failed (exit {proc.returncode}):\n{tail}")
    print(proc.stdout.strip())
    return out
