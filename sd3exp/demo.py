"""The built-in CPU demo's assets: the tiny SD3 and a generated dataset, made on first use."""

from __future__ import annotations

from pathlib import Path

from sd3exp import console, trainer_env
from sd3exp.demo_data import make_demo_dataset, outdated, set_aside
from sd3exp.errors import ConfigError
from sd3exp.runfolder import waiting_lock
from sd3exp.schema import ExperimentConfig
from sd3exp.tinymodel import MARKER, build_tiny_model

# 4 squares, 4 landscapes, 4 portraits: three aspect buckets of one batch of 4 at resolution 64.
DEMO_COUNTS = {(64, 64): 4, (128, 64): 4, (64, 128): 4}


# Where `demo: true` may build what it does not find: the project's own, git-ignored asset folders.
DEMO_DATA, DEMO_MODELS = "data/demo", "models"


def in_demo_home(path: Path, root: Path, folder: str) -> bool:
    return (root / folder).resolve() in path.resolve().parents


def older_demo_dataset(folder: Path, root: Path) -> bool:
    """A dataset an older demo (other image counts) generated in the project's demo folder: set aside and
    generated anew. Folders elsewhere, even demo-made ones, are the user's and left alone."""
    return in_demo_home(folder, root, DEMO_DATA) and outdated(folder, DEMO_COUNTS)


def demo_path(field: str, path: Path, root: Path, folder: str) -> Path:
    """`path` if it lies in the project's demo asset `folder`; a missing path elsewhere is the user's mistake."""
    home = (root / folder).resolve()
    if not in_demo_home(path, root, folder):
        raise ConfigError(field, str(path), f"not found; demo: true builds demo assets only inside {home}",
                          "fix the path, or set demo=false to use your own files")
    return path


def ensure_demo_assets(cfg: ExperimentConfig, with_model: bool) -> None:
    """Build what a `demo: true` experiment needs and does not find, at the demo's own paths (one job at
    a time: the jobs of a sweep start at once)."""
    root = Path(cfg.paths.root_dir)
    for i, c in enumerate(cfg.concepts):
        if not Path(c.path).exists() or older_demo_dataset(Path(c.path), root):
            folder = demo_path(f"concepts[{i}].path", Path(c.path), root, DEMO_DATA)
            with waiting_lock(folder.parent, "is generating the demo dataset in"):
                if older_demo_dataset(folder, root):
                    console.info(f"demo: {folder} holds an older demo's dataset; kept as {set_aside(folder)}")
                if not folder.exists():
                    console.info(f"demo: generating the demo dataset at {folder}")
                    make_demo_dataset(folder, c.trigger, DEMO_COUNTS, cfg.seed)
    model = Path(cfg.model.path)
    ours = (model / MARKER).is_file()  # a tiny SD3 of an older recipe is rebuilt; other folders are left alone
    if with_model and (ours or not model.exists()):
        if not ours:
            demo_path("model.path", model, root, DEMO_MODELS)
        with waiting_lock(model.parent, "is building the tiny model in"):
            t = cfg.trainer
            env = trainer_env.locate(t.simpletuner, t.version, t.home)
            if not (model / MARKER).is_file():
                console.info(f"demo: building the tiny SD3 at {model} (its VAE trains for about 2 minutes, once)")
            build_tiny_model(model, env.python, seed=0)
