"""Which device and dtype the diffusers worker renders on (pure functions, stdlib only: the worker
imports this file from its own folder, the tests from sd3exp.workers)."""

from __future__ import annotations

DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def pick_device(requested: str, cuda: bool, mps: bool) -> str:
    """eval.device: auto is CUDA when there is one, else Apple's MPS, else the CPU; a device asked
    for that is not there is an error."""
    if requested not in DEVICES:
        raise ValueError(f"eval.device={requested!r}: one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise ValueError(f"eval.device={requested}: torch sees no {requested.upper()} device here; "
                         "use eval.device=auto (or cpu)")
    return requested


def pick_dtype(requested: str, device: str, bf16: bool) -> str:
    """eval.dtype: auto is bf16 on CUDA that supports it, fp16 on older CUDA and on MPS, fp32 on the CPU."""
    if requested not in DTYPES:
        raise ValueError(f"eval.dtype={requested!r}: one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16" if bf16 else "fp16"
    return "fp16" if device == "mps" else "fp32"
