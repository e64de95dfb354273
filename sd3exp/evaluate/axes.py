"""Evaluation axes besides checkpoint, prompt and seed: LoRA strength, CFG, steps, sampler, scheduler
and shift (pure, stdlib only).

Each eval key takes a scalar or a list; every combination of their values is rendered for every
checkpoint, prompt and seed. `eval.lora_scales` multiplies a LoRA's trained alpha/rank and does not
apply to the base model or a full checkpoint (their cells record it as None). Sampler and scheduler
are ComfyUI names (KSampler sampler_name / scheduler); the diffusers backend maps the ones it has an
equivalent for and refuses the others. None keeps the workflow's (or the pipeline's) own value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sd3exp.errors import ConfigError
from sd3exp.evaluate.cells import Variant

# axis -> (eval key, header label, type)
AXES: Dict[str, Tuple[str, str, type]] = {
    "lora_scale": ("eval.lora_scales", "Strength", float),
    "cfg": ("eval.cfg", "CFG", float),
    "steps": ("eval.steps", "Steps", int),
    "sampler": ("eval.sampler", "Sampler", str),
    "scheduler": ("eval.scheduler", "Scheduler", str),
    "shift": ("eval.shift", "Shift", float),
}
SLUG = {"lora_scale": "x", "cfg": "cfg", "steps": "st", "sampler": "", "scheduler": "", "shift": "sh"}
# ComfyUI sampler_name -> diffusers scheduler class (flow matching, as SD3 is trained)
DIFFUSERS_SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}
# ComfyUI scheduler -> FlowMatchEulerDiscreteScheduler option ("simple": its own evenly spaced sigmas)
DIFFUSERS_SCHEDULERS: Dict[str, Dict[str, bool]] = {
    "simple": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
Combo = Tuple[Tuple[str, Any], ...]  # (axis, value) for every axis, in AXES order


def _as_list(value: Any) -> List[Any]:
    """A scalar as a one-item list; a list (or OmegaConf ListConfig) as a list."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return [value]
    return list(value)


def _typed(axis: str, value: Any) -> Any:
    key, _, kind = AXES[axis]
    bad = isinstance(value, bool) or (kind is str and not isinstance(value, str)) or \
        (kind is int and not isinstance(value, int)) or (kind is float and not isinstance(value, (int, float)))
    if value is None or bad:
        example = {"eval.lora_scales": "[0.5,1.0]", "eval.cfg": "[3.0,4.5]", "eval.steps": "[20,28]",
                   "eval.sampler": "euler", "eval.scheduler": "simple", "eval.shift": "[1.0,3.0]"}[key]
        raise ConfigError(key, value, f"each value must be a {kind.__name__}", f"e.g. {key}={example}")
    value = kind(value)
    if kind is not str and not value > 0:
        raise ConfigError(key, value, "must be greater than 0", f"e.g. {key}=1")
    return value


def axis_values(ev: Any) -> Dict[str, List[Any]]:
    """Every axis's values from the eval config, checked and typed ([None]: the workflow's own)."""
    given = {"lora_scale": ev.lora_scales, "cfg": ev.cfg, "steps": ev.steps, "sampler": ev.sampler,
             "scheduler": ev.scheduler, "shift": ev.shift}
    found = {}
    for axis, value in given.items():
        items = _as_list(value)
        if value is None:
            found[axis] = [None]
            continue
        if not items:
            key = AXES[axis][0]
            raise ConfigError(key, [], "is empty: there is nothing to render", f"give one value, e.g. {key}=1")
        found[axis] = list(dict.fromkeys(_typed(axis, v) for v in items))
    return found


def check_diffusers(values: Mapping[str, Sequence[Any]]) -> None:
    """The sampler and scheduler names diffusers has an equivalent for; ConfigError otherwise."""
    for axis, known in (("sampler", DIFFUSERS_SAMPLERS), ("scheduler", DIFFUSERS_SCHEDULERS)):
        for value in values[axis]:
            if value is not None and value not in known:
                key = AXES[axis][0]
                raise ConfigError(key, value, f"has no diffusers equivalent; the diffusers backend supports "
                                  f"{', '.join(known)}", f"use {key}={next(iter(known))}, or eval.backend=comfyui")
    if "heun" in values["sampler"] and any(s not in (None, "simple") for s in values["scheduler"]):
        raise ConfigError("eval.scheduler", values["scheduler"], "diffusers' heun sampler has only its own "
                          "(simple) sigmas", "use eval.scheduler=simple with eval.sampler=heun")


def combos(values: Mapping[str, Sequence[Any]], lora: bool) -> List[Combo]:
    """Every combination, the first axis slowest; a non-LoRA checkpoint has no strength (None)."""
    lists = [values[a] if (a != "lora_scale" or lora) else [None] for a in AXES]
    return list(dict.fromkeys(tuple(zip(AXES, product)) for product in itertools.product(*lists)))


def combo_of(axes: Mapping[str, Any]) -> Combo:
    """A cell's axis values (cells.json `axes`) as a Combo; axes it does not record are None."""
    return tuple((a, axes.get(a)) for a in AXES)


def varying(values: Mapping[str, Sequence[Any]]) -> List[str]:
    """The axes with more than one value, in AXES order."""
    return [a for a in AXES if len(values[a]) > 1]


def slug(combo: Combo, shown: Sequence[str]) -> str:
    """The image-name part of a combination: the `shown` axes' values ("" when none), e.g. `_x0.5_cfg3`."""
    parts = [f"{SLUG[a]}{v:g}" if isinstance(v, float) else f"{SLUG[a]}{v}" for a, v in combo
             if a in shown and v is not None]
    return "".join(f"_{p}" for p in parts)


def header(axis: str, value: Any) -> str:
    """"Label: value" for a grid header."""
    shown = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    return f"{AXES[axis][1]}: {shown}"


@dataclass(frozen=True)
class NodeInputs:
    """The ComfyUI node inputs that reproduce one combination."""

    combo: Combo
    strength_model: Optional[float]  # LoraLoaderModelOnly: trained scale x the multiplier

    def lines(self) -> List[str]:
        values = dict(self.combo)
        found = [f"LoraLoaderModelOnly strength_model={self.strength_model:.6g}"] \
            if self.strength_model is not None else []
        sampler = [f"{k}={values[a]:g}" if isinstance(values[a], float) else f"{k}={values[a]}"
                   for a, k in (("cfg", "cfg"), ("steps", "steps"), ("sampler", "sampler_name"),
                                ("scheduler", "scheduler")) if values.get(a) is not None]
        found += [f"KSampler {' '.join(sampler)}"] if sampler else []
        found += [f"ModelSamplingSD3 shift={values['shift']:g}"] if values.get("shift") is not None else []
        return found


def variants(values: Mapping[str, Sequence[Any]], lora: bool) -> List[Variant]:
    """A checkpoint's variants: every combination, named by the axes that vary."""
    shown = varying(values)
    return [Variant(slug(c, shown), c) for c in combos(values, lora)]
