"""TensorBoard event files under <run>/tensorboard: the run's scalars and images by step
(`tensorboard --logdir outputs` shows the runs side by side)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from sd3exp.tracking.record import RunRecord

FOLDER = "tensorboard"
MAX_SIDE = 2048  # a grid sheet larger than this is shrunk for TensorBoard


def pixels(path: Path) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return np.asarray(image)


def write(record: RunRecord, run_dir: Path) -> Path:
    """The run's event file, written whole beside the last one, which it then replaces."""
    folder, staging = run_dir / FOLDER, run_dir / f"{FOLDER}.next"
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    writer = SummaryWriter(logdir=str(staging))
    for key, value, step in record.metrics:
        writer.add_scalar(key, value, step)
    for tag, path, step in record.images:
        if path.is_file():
            writer.add_image(tag, pixels(path), step, dataformats="HWC")
    writer.close()
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder
