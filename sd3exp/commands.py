"""Subcommands beside the Hydra pipeline: set-up (trainer venv, tiny model, demo data) and review."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List

from sd3exp import console, trainer_env
from sd3exp.best import best_main
from sd3exp.lock import lock_main
from sd3exp.project import ROOT
from sd3exp.rundiff import diff_main


def setup_trainer(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="sd3exp setup-trainer",
                                     description="Create (once) the SimpleTuner venv that sd3exp trains with.")
    parser.add_argument("--home", type=Path, default=None, help="where trainer venvs live (default: user cache)")
    parser.add_argument("--version", default=trainer_env.DEFAULT_VERSION)
    args = parser.parse_args(argv)
    env = trainer_env.ensure(args.version, args.home)
    console.info(f"trainer ready: SimpleTuner {env.version} at {env.root} (python: {env.python})")
    return 0


def make_tiny_model(argv: List[str]) -> int:
    from sd3exp.tinymodel import VAE_STEPS, build_tiny_model

    parser = argparse.ArgumentParser(prog="sd3exp make-tiny-model",
                                     description="Build the tiny SD3 pipeline: random transformer and text encoders, "
                                                 "a VAE trained on generated shapes (no download).")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-sd3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="VAE training steps; 0 keeps it random")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args(argv)
    env = trainer_env.ensure(trainer_env.DEFAULT_VERSION, args.home)
    build_tiny_model(args.out, env.python, args.seed, args.vae_steps)
    return 0


def doctor(argv: List[str]) -> int:
    from sd3exp.doctor import doctor_main

    return doctor_main(argv)


SUBCOMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "setup-trainer": setup_trainer,
    "make-tiny-model": make_tiny_model,
    "diff": diff_main,
    "lock": lock_main,
    "best": best_main,
    "doctor": doctor,
}
