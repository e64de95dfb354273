"""The built-in CPU demo's assets: the tiny SD3 and a generated dataset, made on first use."""

from __future__ import annotations

from pathlib import Path

from sd3exp import trainer_env
from sd3exp.demo_data import make_demo_dataset
from sd3exp.errors import ConfigError
from sd3exp.schema import ExperimentConfig
from sd3exp.tinymodel import build_tiny_model

# 8 squares, 4 landscapes, 4 portraits: three aspect buckets at resolution 64.
DEMO_COUNTS = {(64, 64): 8, (128, 64): 4, (64, 128): 4}


# Where `demo: true` may build what it does not find: the project's own, git-ignored asset folders.
DEMO_DATA, DEMO_MODELS = "data/demo", "models"


def demo_path(field: str, path: Path, root: Path, folder: str) -> Path:
    """`path` if it lies in the project's demo asset `folder`; a missing path elsewhere is the user's mistake."""
    home = (root / folder).resolve()
    if home not in path.resolve().parents:
        raise ConfigError(field, str(path), f"not found; demo: true builds demo assets only inside {home}",
                          "fix the path, or set demo=false to use your own files")
    return path


def ensure_demo_assets(cfg: ExperimentConfig, with_model: bool) -> None:
    """Build what a `demo: true` experiment needs and does not find, at the demo's own paths."""
    root = Path(cfg.paths.root_dir)
    for i, c in enumerate(cfg.concepts):
        if not Path(c.path).exists():
            folder = demo_path(f"concepts[{i}].path", Path(c.path), root, DEMO_DATA)
            print(f"demo: generating the demo dataset at {folder}")
            make_demo_dataset(folder, c.trigger, DEMO_COUNTS, cfg.seed)
    model = Path(cfg.model.path)
    if with_model and not model.exists():
        demo_path("model.path", model, root, DEMO_MODELS)
        t = cfg.trainer
        env = trainer_env.locate(t.simpletuner, t.version, t.home)
        print(f"demo: building the tiny random SD3 at {model}")
        build_tiny_model(model, env.python, seed=0)
