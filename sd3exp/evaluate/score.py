"""Scores per cell and the best checkpoint (eval/best.json, eval/scores.png).

The weight-free measures need no model and run here (numpy, Pillow), on small
thumbnails (eval.scoring.thumbnail pixels a side, RGB in [0, 1]):
- pixel_fidelity: 100 x (1 - RMS distance to the nearest training image of the prompt's
  concept(s): those whose trigger the prompt contains, else every concept);
- drift: 100 x RMS distance to the base model's render of the same prompt and seed (needs
  eval.include_base=true).
- holdout_pixel: the same against the concept's held-out images (concepts.N.holdout), which
  never count as training images.
With eval.scoring.clip / dino / pickscore / aesthetic / hps (local models), CLIP-T, CLIP-I,
DINO-I, PickScore, aesthetic and HPSv2.1 are added by a worker in the trainer venv
(sd3exp/evaluate/models.py). A cell is scored
once: its scores are kept in cells.json with a digest of what they depend on besides the
image (settings, training images, models), and reused while that digest holds.
Failed cells are left out of the scores and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from sd3exp import console
from sd3exp.evaluate import models
from sd3exp.evaluate.axes import NodeInputs, combo_of, header
from sd3exp.evaluate.cells import BASE_LABEL, Cell, cell_image, column_title
from sd3exp.evaluate.select import MEASURES, Candidate, Choice, Rule, choose, make_rule, mean_scores
from sd3exp.images import list_images
from sd3exp.io import read_json, write_bytes, write_json
from sd3exp.layout import EvalLayout, RunLayout
from sd3exp.schema import ExperimentConfig

METRICS_FILE = "training_metrics.jsonl"  # SimpleTuner's own, in its output_dir, with trainer.report_to=simpletuner


def thumbnail(source: Union[Path, bytes], side: int) -> np.ndarray:
    """The image as a side x side x 3 float array in [0, 1] (squashed to a square, bilinear)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        small = im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float64) / 255.0


def rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance between `a` and each image of `b` (a stack, or one image)."""
    return np.sqrt(np.mean((b - a) ** 2, axis=(-3, -2, -1)))


def pixel_fidelity(render: np.ndarray, training: np.ndarray) -> float:
    """100 x (1 - RMS distance to the nearest of the `training` thumbnails)."""
    return float(100.0 * (1.0 - np.min(rms(render, training))))


def drift(render: np.ndarray, base: np.ndarray) -> float:
    """100 x RMS distance to the base model's render."""
    return float(100.0 * rms(render, base))


@dataclass(frozen=True)
class TrainingSet:
    trigger: str
    paths: Tuple[Path, ...]
    digests: Tuple[str, ...]  # sha256 of each image file
    thumbs: np.ndarray  # N x side x side x 3


def _image_set(trigger: str, images: Sequence[Path], side: int) -> TrainingSet:
    return TrainingSet(trigger, tuple(images), tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in images),
                       np.stack([thumbnail(p, side) for p in images]))


def concept_images(cfg: ExperimentConfig) -> Dict[str, Tuple[List[Path], List[Path]]]:
    """(trained, held out) images of each concept whose folder has images; the held-out ones
    (concepts.N.holdout, chosen as prepare chooses them) are never trained on."""
    from sd3exp import holdout

    found = {}
    for concept in cfg.concepts:
        folder = Path(concept.path)
        images = list_images(folder) if folder.is_dir() else []
        held = set(holdout.held_out(concept, [p.name for p in images], cfg.seed))
        if images:
            found[concept.id] = ([p for p in images if p.name not in held], [p for p in images if p.name in held])
    return found


def training_sets(cfg: ExperimentConfig) -> Dict[str, TrainingSet]:
    """Thumbnails of each concept's trained images, for the concepts whose folder exists."""
    side, triggers = cfg.eval.scoring.thumbnail, {c.id: c.trigger for c in cfg.concepts}
    return {cid: _image_set(triggers[cid], trained, side) for cid, (trained, _) in concept_images(cfg).items()}


def holdout_sets(cfg: ExperimentConfig) -> Dict[str, TrainingSet]:
    """Thumbnails of each concept's held-out images, for the concepts that hold some out."""
    side, triggers = cfg.eval.scoring.thumbnail, {c.id: c.trigger for c in cfg.concepts}
    return {cid: _image_set(triggers[cid], held, side) for cid, (_, held) in concept_images(cfg).items() if held}


def concepts_of(prompt: str, sets: Mapping[str, TrainingSet]) -> List[str]:
    """The concepts a prompt is about: those whose trigger it contains, else all."""
    named = [cid for cid, s in sets.items() if s.trigger and s.trigger in prompt]
    return named or list(sets)


def scoring_key(cfg: ExperimentConfig, sets: Mapping[str, TrainingSet], folders: Mapping[str, Path],
                held: Optional[Mapping[str, TrainingSet]] = None) -> str:
    """Digest of what a cell's scores depend on besides its own image."""
    sc = cfg.eval.scoring
    data = {"thumbnail": sc.thumbnail, "memorised_pixel": sc.memorised_pixel,
            "training": {cid: list(s.digests) for cid, s in sets.items()},
            **({"holdout": {cid: list(s.digests) for cid, s in held.items()}} if held else {}),
            "models": {k: models.model_digest(f) for k, f in folders.items()},
            "memorised_cosine": sc.memorised_cosine if folders else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _image(cell: Cell, side: int) -> Optional[np.ndarray]:
    source = cell_image(cell) if cell.status == "ok" else None
    try:
        return thumbnail(source, side) if source is not None else None
    except OSError:
        return None


def score_cells(cfg: ExperimentConfig, cells: Sequence[Cell], work_dir: Optional[Path] = None
                ) -> Tuple[List[Cell], int, int]:
    """The cells with their weight-free scores, how many were scored now and how many scores
    were kept (scored earlier under the same key); failed cells are neither. The CLIP/DINO worker's
    files go to `work_dir` (default the run's eval/)."""
    sc = cfg.eval.scoring
    sets, held, folders = training_sets(cfg), holdout_sets(cfg), models.scoring_models(sc)
    key = scoring_key(cfg, sets, folders, held)
    base = {(c.prompt_index, c.seed, _sampling_of(c)): c for c in cells if c.label == BASE_LABEL}
    todo = [i for i, c in enumerate(cells) if c.status == "ok" and c.scored_with != key]
    out = list(cells)
    pools: Dict[Tuple[str, ...], Any] = {}
    for i in console.progress(todo, desc="scoring", unit="cell", disable=not todo):
        cell = cells[i]
        image = _image(cell, sc.thumbnail)
        if image is None:
            out[i] = replace(cell, scores={}, memorised=None, scored_with="")
            continue
        scores = {}
        names = tuple(concepts_of(cell.prompt, sets))
        if names:
            pool = pools.get(names)
            if pool is None:
                pool = pools[names] = np.concatenate([sets[n].thumbs for n in names])
            scores["pixel_fidelity"] = pixel_fidelity(image, pool)
        unseen = [held[n].thumbs for n in names if n in held]
        if unseen:
            scores["holdout_pixel"] = pixel_fidelity(image, np.concatenate(unseen))
        base_cell = base.get((cell.prompt_index, cell.seed, _sampling_of(cell)))
        base_image = _image(base_cell, sc.thumbnail) if base_cell is not None else None
        if base_image is not None:
            scores["drift"] = drift(image, base_image)
        memorised = scores["pixel_fidelity"] > sc.memorised_pixel if "pixel_fidelity" in scores else None
        out[i] = replace(cell, scores=scores, memorised=memorised, scored_with=key)
    if folders:
        out = model_scores(cfg, out, [i for i in todo if out[i].scored_with], (sets, held), folders,
                           work_dir or RunLayout(Path(cfg.paths.run_dir)).eval.folder)
    return out, len(todo), sum(c.status == "ok" for c in cells) - len(todo)


def model_scores(cfg: ExperimentConfig, cells: List[Cell], todo: Sequence[int],
                 image_sets: Tuple[Mapping[str, TrainingSet], Mapping[str, TrainingSet]],
                 folders: Mapping[str, Path], work: Path) -> List[Cell]:
    """The model measures added to the cells at `todo` (by the trainer venv's worker; image_sets: the
    trained and the held-out images); when the worker fails the cells keep their weight-free scores,
    unscored_by_models() finds them and they are scored again next time."""
    from sd3exp.trainer_env import trainer_for

    if not todo:
        return cells
    sc = cfg.eval.scoring
    sets, held = image_sets
    job = models.make_job(folders, {cid: list(zip(s.paths, s.digests)) for cid, s in sets.items()},
                          [{"id": i, "image": str(cell_image(cells[i])), "prompt": cells[i].prompt,
                            "concepts": concepts_of(cells[i].prompt, sets)} for i in todo],
                          models.cache_dir(sc.cache_dir), {cid: list(zip(s.paths, s.digests)) for cid, s in held.items()})
    try:
        found = models.run_worker(job, trainer_for(cfg).python, work, cfg.eval.timeout_s)
    except (OSError, subprocess.SubprocessError, KeyError, ValueError) as err:
        console.warn(f"model scoring failed ({err}); scored without the model measures. The end of score.log:\n  "
                     + "\n  ".join(models.tail(work / "score.log")))
        return [replace(c, scored_with="") if i in set(todo) else c for i, c in enumerate(cells)]
    out = list(cells)
    for i in todo:
        got = found[str(i)]
        near = any(got.get(f"{k}_max", -1.0) > sc.memorised_cosine for k in folders)
        measures = {m: v for m, v in got.items() if m in MEASURES}
        out[i] = replace(cells[i], scores={**cells[i].scores, **measures}, memorised=bool(cells[i].memorised) or near)
    return out


def _sampling_of(cell: Cell) -> tuple:
    """A cell's axis values but its LoRA strength: the base render it drifted from has the same."""
    return tuple(sorted((k, v) for k, v in cell.axes.items() if k != "lora_scale"))


def _cell_view(cell: Cell) -> dict:
    return {"label": cell.label, "step": cell.step, "status": cell.status, "scores": cell.scores,
            "memorised": cell.memorised, "variant": cell.variant, "axes": cell.axes}


def checkpoint_path(record: Mapping, label: str) -> Optional[str]:
    entry = record.get("checkpoints", {}).get(label)
    return entry[0] if entry else None


def best_record(choice: Choice, candidates: Sequence[Candidate], record: Mapping,
                strengths: Optional[Mapping[str, float]] = None) -> dict:
    """eval/best.json: the chosen checkpoint (and combination, with the ComfyUI node inputs that
    reproduce it; `strengths`: LoRA label -> strength_model at multiplier 1), its scores, the rule,
    the runners-up, what was left out."""
    def entry(c: Candidate) -> dict:
        return {**c.to_dict(), "checkpoint": checkpoint_path(record, c.label),
                "comfyui": node_inputs(c, strengths or {}).lines()}

    base = next((c for c in candidates if c.label == BASE_LABEL), None)
    return {"best": entry(choice.best) if choice.best else None, "rule": choice.rule.to_dict(),
            "runners_up": [entry(c) for c in choice.ranked[1:4]],
            "excluded": [{**entry(c), "reason": why} for c, why in choice.excluded if c.label != BASE_LABEL],
            "base": base.to_dict() if base else None,
            "failed_cells": sum(c.failed for c in candidates),
            "measures": {m: MEASURES[m][1] for m in dict.fromkeys(m for c in candidates for m in c.scores)}}


def summary_line(choice: Choice, strengths: Optional[Mapping[str, float]] = None) -> str:
    """One line: the chosen checkpoint, why, the rule, and the combination with its ComfyUI node inputs
    (`strengths`: LoRA label -> strength_model at multiplier 1)."""
    rule, best = choice.rule, choice.best
    if best is None:
        return f"best checkpoint: none (no checkpoint meets the rule: {rule.text()})"
    return (f"best checkpoint: {column_title(best.label, best.step)} ({best.label}): "
            f"{rule.objective} {best.scores[rule.objective]:.6g}, best of {len(choice.ranked)} eligible "
            f"(rule: {rule.text()}){combination(best, strengths or {})}")


def combination(candidate: Candidate, strengths: Mapping[str, float]) -> str:
    """"; at Strength: 0.5, CFG: 3; ComfyUI: LoraLoaderModelOnly strength_model=0.5; KSampler cfg=3" for
    the axis values that are set ("" when none is)."""
    shown = [header(a, v) for a, v in candidate.axes.items() if v is not None]
    inputs = node_inputs(candidate, strengths).lines()
    return (f"; at {', '.join(shown)}" if shown else "") + (f"; ComfyUI: {'; '.join(inputs)}" if inputs else "")


def node_inputs(candidate: Candidate, strengths: Mapping[str, float]) -> NodeInputs:
    """The ComfyUI inputs for a candidate: strength_model = the checkpoint's x the strength multiplier."""
    strength = strengths.get(candidate.label)
    if strength is not None:
        strength *= float(candidate.axes.get("lora_scale") or 1.0)
    return NodeInputs(combo_of(candidate.axes), strength)


def rule_of(cfg: ExperimentConfig) -> Rule:
    sel = cfg.eval.select
    return make_rule(sel.objective, sel.direction, sel.at_least, sel.at_most, sel.not_memorised)


def check_scoring(cfg: ExperimentConfig) -> None:
    """Refuse, before any rendering, a selection rule or scoring set-up that cannot work: every model
    is found and loads (once per set of models, in the trainer venv)."""
    sc = cfg.eval.scoring
    if sc.enabled:
        rule_of(cfg)
        found = models.scoring_models(sc)
        if found:
            from sd3exp.trainer_env import trainer_for

            models.check_loading(found, trainer_for(cfg).python, models.cache_dir(sc.cache_dir), cfg.eval.timeout_s)


def unscored_by_models(cfg: ExperimentConfig, cells: Sequence[Cell]) -> int:
    """How many good cells lack their model measures (the scoring worker failed): they have
    weight-free scores but no scoring key."""
    sc = cfg.eval.scoring
    wanted = sc.enabled and any((sc.clip, sc.dino, sc.pickscore, sc.aesthetic, sc.hps))
    return sum(c.status == "ok" and bool(c.scores) and not c.scored_with for c in cells) if wanted else 0


def scoring_request(cfg: ExperimentConfig) -> dict:
    """The scoring settings and selection rule, part of an evaluation's request.json: changing them
    evaluates again (every cell reused, only scores that depend on the change computed)."""
    return {"scoring": asdict(cfg.eval.scoring), "select": asdict(cfg.eval.select)}


def print_best(eval_dir: Path) -> None:
    """The best-checkpoint line of an earlier evaluation, when it was scored."""
    from sd3exp.best import run_line

    best = read_best(eval_dir)
    if best is not None:
        console.info(f"best checkpoint: {run_line(best)}")


def best_label(choice: Optional[Choice]) -> Optional[str]:
    return choice.best.label if choice and choice.best else None


def best_variant(choice: Optional[Choice]) -> Optional[str]:
    return choice.best.variant if choice and choice.best else None


def read_best(eval_dir: Path) -> Optional[dict]:
    """eval/best.json, or None when the evaluation chose nothing (scoring off)."""
    path = EvalLayout(eval_dir).best
    return read_json(path) if path.is_file() else None


def training_metrics(training_dir: Path) -> List[dict]:
    """SimpleTuner's metric records (one JSON object a line), [] without the file; unreadable lines skipped."""
    path = training_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("metrics"), dict):
            records.append(record)
    return records


def objective(run_dir: Path) -> Optional[float]:
    """The run's objective: its best checkpoint's score under the rule; NaN when the rule chose none;
    None when the run was not scored."""
    best = read_best(RunLayout(Path(run_dir)).eval.folder)
    if best is None:
        return None
    chosen = best["best"]
    return float(chosen["scores"][best["rule"]["objective"]]) if chosen else math.nan


def choose_best(cfg: ExperimentConfig, run_dir: Path, cells: Sequence[Cell], record: Mapping,
                out_dir: Optional[Path] = None, strengths: Optional[Mapping[str, float]] = None
                ) -> Tuple[List[Cell], Optional[Choice]]:
    """Score the cells not yet scored, choose the best checkpoint, write best.json and scores.png into
    `out_dir` (default the run's eval/; scores.png only when a cell has a score). With
    eval.scoring.enabled=false: the cells as they are, no choice."""
    if not cfg.eval.scoring.enabled:
        return list(cells), None
    from sd3exp import plots

    rule = rule_of(cfg)
    eval_dir = out_dir or RunLayout(run_dir).eval.folder
    cells, fresh, kept = score_cells(cfg, cells, eval_dir)
    candidates = mean_scores([_cell_view(c) for c in cells])
    choice = choose(candidates, rule)
    failed = sum(c.failed for c in candidates)
    console.info(f"scored {fresh} new cell(s), {kept} kept from the last evaluation"
          + (f"; {failed} failed cell(s) left out of the scores" if failed else ""))
    write_json(EvalLayout(eval_dir).best, best_record(choice, candidates, record, strengths))
    if any(c.scores for c in candidates):  # no chart of nothing (every cell failed)
        write_bytes(EvalLayout(eval_dir).scores_plot, plots.score_plot(
            candidates, choice.best.label if choice.best else None, rule.objective, best_variant(choice) or ""))
    metrics = training_metrics(Path(cfg.paths.training_dir))
    if metrics:
        write_bytes(EvalLayout(eval_dir).training_plot, plots.training_plot(metrics, choice.best.step if choice.best else None))
    return cells, choice
