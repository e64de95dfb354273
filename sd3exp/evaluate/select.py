"""Choosing the best checkpoint: a stated rule over per-checkpoint mean scores (pure, no I/O).
With evaluation axes a candidate is a checkpoint at one combination (strength, CFG, ...).

The rule: the objective measure and its direction, optional guards (a measure's mean at
least / at most a value, no memorised cell); ties go to the earlier step (the final model,
which has no step, counts as the latest). The base model is scored but never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sd3exp.errors import ConfigError
from sd3exp.evaluate.digits import fmt

# measure -> (direction that is better, what it is)
MEASURES: Dict[str, Tuple[str, str]] = {
    "pixel_fidelity": ("max", "100 x (1 - RMS pixel distance to the nearest training image, on thumbnails)"),
    "drift": ("min", "100 x RMS pixel distance to the base model's render of the same prompt and seed"),
    "clip_t": ("max", "prompt adherence: 100 x max(CLIP image-text cosine, 0), torchmetrics' CLIPScore"),
    "clip_i": ("max", "concept fidelity: mean CLIP image cosine to the concept's training images"),
    "dino_i": ("max", "concept fidelity: mean DINO image cosine to the concept's training images"),
    "pickscore": ("max", "human preference: PickScore, logit_scale x cosine of PickScore's image and text embeddings"),
    "aesthetic": ("max", "LAION aesthetic predictor v2 (1-10): its MLP on the normalised CLIP ViT-L/14 image embedding"),
    "hps": ("max", "human preference: 100 x HPSv2.1's image-text cosine (open_clip ViT-H-14)"),
    "holdout_pixel": ("max", "generalisation: 100 x (1 - RMS pixel distance to the nearest held-out image)"),
    "holdout_clip": ("max", "generalisation: mean CLIP image cosine to the concept's held-out images"),
    "holdout_dino": ("max", "generalisation: mean DINO image cosine to the concept's held-out images"),
}
BASE_LABEL = "base"


@dataclass(frozen=True)
class Rule:
    objective: str
    direction: str  # max | min
    at_least: Mapping[str, float] = field(default_factory=dict)
    at_most: Mapping[str, float] = field(default_factory=dict)
    not_memorised: bool = False

    def text(self) -> str:
        guards = [f"{m} >= {v:g}" for m, v in sorted(self.at_least.items())]
        guards += [f"{m} <= {v:g}" for m, v in sorted(self.at_most.items())]
        guards += ["no memorised cell"] if self.not_memorised else []
        where = f" where {' and '.join(guards)}" if guards else ""
        return f"{'highest' if self.direction == 'max' else 'lowest'} mean {self.objective}{where}; " \
               "ties go to the earlier step"

    def to_dict(self) -> dict:
        return {"objective": self.objective, "direction": self.direction, "at_least": dict(self.at_least),
                "at_most": dict(self.at_most), "not_memorised": self.not_memorised, "text": self.text()}


@dataclass(frozen=True)
class Candidate:
    """One checkpoint's scores: means over its scored cells."""

    label: str
    step: Optional[int]
    scores: Mapping[str, float]
    cells: int  # scored cells
    failed: int  # cells left out: failed renders or unreadable images
    memorised: int  # scored cells flagged as near-copies
    variant: str = ""  # the combination's name ("" when there is one)
    axes: Mapping[str, Any] = field(default_factory=dict)  # axis -> value (sd3exp/evaluate/axes.py)

    def to_dict(self) -> dict:
        return {"label": self.label, "step": self.step, "scores": dict(self.scores), "cells": self.cells,
                "failed": self.failed, "memorised": self.memorised, "variant": self.variant,
                "axes": dict(self.axes)}


@dataclass(frozen=True)
class Choice:
    rule: Rule
    best: Optional[Candidate]
    ranked: List[Candidate]  # eligible, best first
    excluded: List[Tuple[Candidate, str]]  # with the reason


def make_rule(objective: str, direction: Optional[str], at_least: Mapping[str, float],
              at_most: Mapping[str, float], not_memorised: bool) -> Rule:
    """The rule from eval.select, checked: known measures, a known direction."""
    for key, names in (("eval.select.objective", [objective]), ("eval.select.at_least", list(at_least)),
                       ("eval.select.at_most", list(at_most))):
        for name in names:
            if name not in MEASURES:
                raise ConfigError(key, name, "not a measure sd3exp computes",
                                  f"use one of {', '.join(MEASURES)}")
    if direction not in (None, "max", "min"):
        raise ConfigError("eval.select.direction", direction, "must be max or min",
                          "leave it unset for the measure's own direction, or set eval.select.direction=max")
    return Rule(objective, direction or MEASURES[objective][0], dict(at_least), dict(at_most), not_memorised)


def mean_scores(cells: Sequence[Mapping]) -> List[Candidate]:
    """Per-checkpoint (and combination) means, in order of first appearance. A cell is a mapping with
    label, step, status, scores, memorised (and variant, axes); cells not ok or without scores are
    counted as failed."""
    order: Dict[Tuple[str, str], List[Mapping]] = {}
    for cell in cells:
        order.setdefault((cell["label"], cell.get("variant", "")), []).append(cell)
    found = []
    for (label, variant), group in order.items():
        scored = [c for c in group if c["status"] == "ok" and c["scores"]]
        names = list(dict.fromkeys(m for c in scored for m in c["scores"]))
        means = {m: math.fsum(vals) / len(vals) for m in names
                 if (vals := [c["scores"][m] for c in scored if m in c["scores"]])}
        found.append(Candidate(label, group[0]["step"], means, len(scored), len(group) - len(scored),
                               sum(bool(c.get("memorised")) for c in scored), variant, group[0].get("axes", {})))
    return found


def why_not(candidate: Candidate, rule: Rule) -> Optional[str]:
    """The reason the rule leaves this checkpoint out, or None when it is eligible."""
    if candidate.label == BASE_LABEL:
        return "the base model is a reference, not a candidate"
    if not math.isfinite(candidate.scores.get(rule.objective, math.nan)):
        return f"no {rule.objective} score"
    for name, low in rule.at_least.items():
        if candidate.scores.get(name, -math.inf) < low:
            value = candidate.scores.get(name, math.nan)
            return f"{name} {fmt(value, low)} < {low:.12g}"
    for name, high in rule.at_most.items():
        if candidate.scores.get(name, math.inf) > high:
            value = candidate.scores.get(name, math.nan)
            return f"{name} {fmt(value, high)} > {high:.12g}"
    if rule.not_memorised and candidate.memorised:
        return f"{candidate.memorised} memorised cell(s)"
    return None


def step_order(candidate: Candidate) -> float:
    return math.inf if candidate.step is None else candidate.step


def choose(candidates: Sequence[Candidate], rule: Rule) -> Choice:
    """The best eligible checkpoint under `rule` (None when none is), the ranking and the exclusions."""
    sign = -1.0 if rule.direction == "max" else 1.0
    eligible, excluded = [], []
    for candidate in candidates:
        reason = why_not(candidate, rule)
        if reason is None:
            eligible.append(candidate)
        else:
            excluded.append((candidate, reason))
    ranked = sorted(eligible, key=lambda c: (sign * c.scores[rule.objective], step_order(c)))
    return Choice(rule, ranked[0] if ranked else None, ranked, excluded)
