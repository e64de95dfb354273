"""Build the tiny SD3 pipeline (random transformer and text encoders, a VAE trained on shapes) with the trainer venv's python."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from . import console
from .demo_data import shape_pixels
from .errors import TrainerError
from .project import WORKERS

WORKER = WORKERS / "build_tiny_sd3.py"
MARKER = "tiny_sd3.json"  # the worker's record of how a folder was built
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
VAE_STEPS = 1000  # the demo's VAE: about 2 minutes on one CPU thread
VAE_IMAGES = 1024  # generated 64x64 shape images (the last 64 held out for the PSNR)
VAE_IMAGE_SIZE = 64


def build_tiny_model(out: Path, python: Path, seed: int, vae_steps: int = VAE_STEPS) -> Path:
    """Build (or find already built) the tiny SD3 folder at out; return its path.

    vae_steps=0 keeps a random VAE (quick; every render is noise).
    """
    if not Path(python).is_file():
        raise TrainerError(f"trainer python {python} does not exist; install the trainer venv first")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="sd3exp-vae-images-") as tmp:
        images = Path(tmp) / "shapes.rgb"
        images.write_bytes(shape_pixels(VAE_IMAGES, VAE_IMAGE_SIZE, seed))
        vae = ["--vae-steps", str(vae_steps), "--vae-images", str(images), "--vae-image-size", str(VAE_IMAGE_SIZE)]
        proc = _run_worker([str(python), str(WORKER), str(out), "--seed", str(seed), *vae], out)
    console.info(proc.stdout.strip())
    return out


def _run_worker(command: list[str], out: Path) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(command, env={**os.environ, **OFFLINE_ENV}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired as err:
        raise TrainerError(f"building the tiny SD3 model at {out} took over {err.timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise TrainerError(f"building the tiny SD3 model at {out} failed (exit {proc.returncode}):\n{tail}")
    return proc
