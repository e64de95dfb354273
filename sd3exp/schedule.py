"""Map the LR curve an experiment asks for onto SimpleTuner 4.10.1's schedulers.

SimpleTuner's `cosine` uses LR_WARMUP_STEPS x num_processes as the cosine
half-period (not as a warmup), so a single decay over the run needs
LR_WARMUP_STEPS = max_train_steps, and cosine with a warmup ramp cannot be
expressed at all. `lr_at` evaluates the curve SimpleTuner will really follow,
from its own formulas, so the plan shows what training will do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

from sd3exp.errors import ConfigError
from sd3exp.schema import ScheduleConfig

SCHEDULES = ("constant", "linear", "cosine", "polynomial")


@dataclass(frozen=True)
class TrainerSchedule:
    """The SimpleTuner settings: lr_scheduler, lr_warmup_steps, lr_end, lr_power."""

    scheduler: str
    warmup_steps: int
    lr_end: float
    power: float = 1.0


def warmup_steps(cfg: ScheduleConfig, max_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_fraction is not None:
        return int(round(cfg.warmup_fraction * max_steps))
    return 0


def to_trainer(cfg: ScheduleConfig, lr: float, max_steps: int) -> TrainerSchedule:
    """The SimpleTuner settings that produce the requested curve, or a ConfigError."""
    warmup = warmup_steps(cfg, max_steps)
    if cfg.name == "constant":
        return TrainerSchedule("constant_with_warmup" if warmup else "constant", warmup, 0.0)
    if cfg.name == "cosine":
        if warmup:
            raise ConfigError(
                "schedule.warmup_steps", warmup,
                "SimpleTuner 4.10.1's cosine scheduler has no warmup ramp (it uses "
                "LR_WARMUP_STEPS as the cosine period, so a warmup would restart the cosine)",
                "drop the warmup, or use schedule.name=linear or polynomial, which do warm up",
            )
        return TrainerSchedule("cosine", max_steps, cfg.final_lr)
    if cfg.name in ("linear", "polynomial"):
        power = 1.0 if cfg.name == "linear" else cfg.power
        return TrainerSchedule("polynomial", warmup, cfg.final_lr, power)
    raise ConfigError("schedule.name", cfg.name, "unknown schedule",
                      f"use one of {', '.join(SCHEDULES)}")


def lr_at(step: int, sched: TrainerSchedule, lr: float, max_steps: int) -> float:
    """The learning rate SimpleTuner applies at global step `step` (one process)."""
    w = sched.warmup_steps
    if sched.scheduler in ("constant_with_warmup", "polynomial") and step < w:
        return lr * step / max(1, w)
    if sched.scheduler in ("constant", "constant_with_warmup"):
        return lr
    if sched.scheduler == "cosine":
        period = w if w > 0 else 1000
        value = sched.lr_end + (lr - sched.lr_end) * (1 + math.cos(math.pi * step / period)) / 2
        return math.floor(value * 1e9) / 1e9
    if step > max_steps:
        return sched.lr_end
    remaining = 1 - (step - w) / max(1, max_steps - w)
    return (lr - sched.lr_end) * remaining**sched.power + sched.lr_end


def curve(sched: TrainerSchedule, lr: float, max_steps: int, points: int = 200) -> List[Tuple[int, float]]:
    """(step, lr) samples over the run, always including the first and last step."""
    stride = max(1, max_steps // points)
    steps = sorted(set(range(0, max_steps + 1, stride)) | {max_steps, sched.warmup_steps} - {-1})
    return [(s, lr_at(s, sched, lr, max_steps)) for s in steps if 0 <= s <= max_steps]
