"""`sd3exp best PATH`: the best checkpoint of a run folder, or the winning job of a multirun folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from sd3exp import console
from sd3exp.errors import EvalError
from sd3exp.io import read_json
from sd3exp.layout import EvalLayout, RunLayout


def run_line(best: dict) -> str:
    rule, chosen = best["rule"], best["best"]
    if chosen is None:
        return f"no checkpoint meets the rule ({rule['text']})"
    step = f"step {chosen['step']}" if chosen["step"] is not None else chosen["label"]
    values = [f"{k}={v}" for k, v in chosen.get("axes", {}).items() if v is not None]
    at = f" at {' '.join(values)}" if values else ""
    comfy = f"; ComfyUI: {'; '.join(chosen['comfyui'])}" if chosen.get("comfyui") else ""
    return (f"{step} ({chosen['label']}){at}: {rule['objective']} {chosen['scores'][rule['objective']]:.6g}; "
            f"{chosen['checkpoint']}{comfy} (rule: {rule['text']})")


def show_run(run_dir: Path) -> int:
    best = read_json(RunLayout(run_dir).eval.best)
    console.info(f"best checkpoint of {run_dir}: {run_line(best)}")
    return 0 if best["best"] else 1


def show_sweep(sweep_dir: Path) -> int:
    from sd3exp.sweep import write_summary

    data = write_summary(sweep_dir)
    ranked = [j for j in data["jobs"] if j["rank"] is not None]
    for job in data["jobs"]:
        b = job["best"]
        score = f"{b['objective']} {b['score']:.6g} at {b['label']}" if b and b["score"] is not None else job["status"]
        values = " ".join(f"{k}={v}" for k, v in job["values"].items())
        console.info(f"  {job['rank'] or '-':>3}  job {job['num']}  {values}  {score}")
    if not ranked:
        console.info(f"no job of {sweep_dir} has a scored evaluation yet")
        return 1
    win = ranked[0]
    console.info(f"winner: job {win['num']} ({sweep_dir / win['run_dir']}), {win['best']['label']}: "
                 f"{win['best']['objective']} {win['best']['score']:.6g}; {win['best']['checkpoint']}")
    return 0


def best_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="sd3exp best", description=__doc__)
    parser.add_argument("path", type=Path, help="a run folder (with eval/best.json) or a multirun folder")
    path = parser.parse_args(argv).path.resolve()
    if not path.is_dir():
        raise EvalError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}. Fix: give a run folder "
                        "(outputs/<experiment>...) or a multirun folder (multirun/<date>/<time>)")
    if RunLayout(path).eval.best.is_file():
        return show_run(path)
    if (path / ".sweep").is_dir():
        return show_sweep(path)
    raise EvalError(f"{path} is neither a scored run folder (no {RunLayout.EVAL}/{EvalLayout.BEST}) nor a multirun folder (no .sweep/). "
                    "Fix: evaluate the run first (python -m sd3exp ... stage=eval), or give the run or multirun folder")
