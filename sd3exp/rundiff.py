"""`sd3exp diff A B`: what two compiled experiments tell SimpleTuner differently.

A and B are run folders, or experiment specs ("fantasy_art lora.rank=32") that
are compiled in memory through the same pipeline code (nothing is written).
Settings are compared key by key: config.env (TRAINER_EXTRA_ARGS split into its
--args), multibackend.json per dataset id, config.json, plan.json and the
resolved YAML; header comments (overrides, config hash) are not settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sd3exp.compile import trainer_args, user_extra_args
from sd3exp.errors import Sd3expError
from sd3exp.experiment import to_experiment
from sd3exp.job import absolute_paths, compiled_files, compose_job, concept_sizes
from sd3exp.layout import RunLayout
from sd3exp.plan import make_plan
from sd3exp.project import CONF_DIR
from sd3exp.runfolder import NOT_SETTINGS
from sd3exp.schema import ConceptConfig, DatasetConfig, ExperimentConfig

SETTINGS_FILES = RunLayout.SETTINGS_FILES
COMPARED = SETTINGS_FILES + (RunLayout.RESOLVED,)
# how the output names each compared file: its name without the folder
ENV, BACKENDS, CONFIG, PLAN, RESOLVED = (Path(rel).name for rel in COMPARED)
PLAN_SKIP = ("lr_curve",)  # derived point by point from the schedule keys, which are compared
HASH_LINE = "# resolved config sha256:"
RUN = "<run>"


class ReviewError(Sd3expError):
    """A diff operand is neither a run folder nor a composable experiment."""


@dataclass(frozen=True)
class Difference:
    file: str
    key: str
    a: Optional[str]
    b: Optional[str]
    yaml: Optional[str] = None


# --- compiling a spec in memory -------------------------------------------------------------------

def spec_files(spec: str, conf_dir: Path) -> Dict[str, str]:
    """Compile "experiment [overrides...]" into memory (its run folder is a temporary path)."""
    words = shlex.split(spec)
    if not words:
        raise ReviewError("an empty experiment spec")
    overrides = words if "=" in words[0] else [f"experiment={words[0]}", *words[1:]]
    with tempfile.TemporaryDirectory(prefix="sd3exp-diff-") as tmp:
        return compiled_files(compose_job(conf_dir, overrides, Path(tmp) / "run"))


def folder_files(run_dir: Path) -> Dict[str, str]:
    missing = [rel for rel in COMPARED if not (run_dir / rel).is_file()]
    if missing:
        raise ReviewError(f"{run_dir} is not a compiled run folder (missing {', '.join(missing)})")
    return {rel: (run_dir / rel).read_text(encoding="utf-8") for rel in COMPARED}


def operand_files(operand: str, conf_dir: Path) -> Dict[str, str]:
    """A run folder's files, or an experiment spec's compiled ones; a first word with a `/` is a folder."""
    path = Path(operand)
    if path.is_dir():
        return folder_files(path)
    if "/" in (operand.split() or [""])[0]:
        raise Sd3expError(f"{operand}: {'not a folder' if path.exists() else 'no such run folder'}. Fix: "
                               "give a run folder (outputs/<experiment>...) or an experiment spec such as "
                               "\"fantasy_art lora.rank=32\"")
    return spec_files(operand, conf_dir)


# --- flattening each file into key -> value -------------------------------------------------------

def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def flatten(data: Any, prefix: str = "") -> Iterator[tuple]:
    """(dotted key, scalar text) leaves; lists of dicts with an `id` are keyed by it."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "id" in x for x in data):
        for item in data:
            yield from flatten({k: v for k, v in item.items() if k != "id"}, f"{prefix}[{item['id']}]")
    else:
        yield prefix, _scalar(data)


def unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def env_settings(text: str) -> Dict[str, str]:
    """KEY=value lines of config.env; TRAINER_EXTRA_ARGS as one key per --arg."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if line.startswith("#") or not sep:
            continue
        if key == "TRAINER_EXTRA_ARGS":
            for token in unquote(value).split():
                name, eq, arg = token.partition("=")
                out[f"{key} {name}"] = arg if eq else "(flag)"
        else:
            out[key] = unquote(value)
    return out


def config_hash(env_text: str) -> Optional[str]:
    lines = [line for line in env_text.splitlines() if line.startswith(HASH_LINE)]
    return lines[0][len(HASH_LINE):].strip() if lines else None


def without_run_dir(text: str, resolved_yaml: str) -> str:
    """`text` with the run folder's own path (paths.run_dir of resolved.yaml) replaced by <run>."""
    run_dir = ((yaml.safe_load(resolved_yaml) or {}).get("paths") or {}).get("run_dir")
    return text.replace(str(run_dir), RUN) if run_dir else text


def yaml_settings(text: str, ignored: Sequence[str]) -> Dict[str, str]:
    """Leaves of resolved.yaml, with the run folder's own path replaced by <run>."""
    data = yaml.safe_load(without_run_dir(text, text)) or {}
    return {k: v for k, v in flatten(data) if not any(k == i or k.startswith(i + ".") for i in ignored)}


def settings(files: Dict[str, str], ignored: Sequence[str]) -> Dict[str, Dict[str, str]]:
    run = RunLayout
    plan = {k: v for k, v in json.loads(files[run.PLAN]).items() if k not in PLAN_SKIP}
    backends = json.loads(without_run_dir(files[run.MULTIBACKEND], files[run.RESOLVED]))
    return {
        ENV: env_settings(files[run.CONFIG_ENV]),
        BACKENDS: dict(flatten({"dataset": backends})),
        CONFIG: dict(flatten(json.loads(files[run.CONFIG_JSON]))),
        PLAN: dict(flatten(plan)),
        RESOLVED: yaml_settings(files[run.RESOLVED], ignored),
    }


# --- SimpleTuner key -> YAML key path ----------------------------------------------------------------

def _backend_field(key: str) -> Optional[str]:
    """`dataset[fantasy].repeats` -> concepts[fantasy].repeats; shared dataset keys -> dataset.X."""
    head, _, name = key.partition("].")
    concept = head[len("dataset["):]
    if name in {f.name for f in dataclasses.fields(DatasetConfig)}:
        return f"dataset.{name}"
    if name in {f.name for f in dataclasses.fields(ConceptConfig)}:
        return f"concepts[{concept}].{name}"
    return f"concepts[{concept}].captions" if name.startswith("caption_shuffle") else None


def yaml_fields(files: Dict[str, str]) -> Dict[str, str]:
    """`<file>:<SimpleTuner key>` -> the YAML field it is compiled from ({} if it cannot be rebuilt)."""
    data = yaml.safe_load(files[RunLayout.RESOLVED])
    try:
        cfg: ExperimentConfig = absolute_paths(to_experiment(
            OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data)))
        plan = make_plan(cfg, concept_sizes(cfg))
    except (Sd3expError, OmegaConfBaseException):  # a YAML that no longer fits the schema: no annotations
        return {}
    out = {}
    for a in trainer_args(cfg, plan, Path(cfg.paths.run_dir)) + user_extra_args(cfg):
        out[f"{CONFIG}:{a.name}"] = a.field
        out[f"{ENV}:{a.env}" if a.env else f"{ENV}:TRAINER_EXTRA_ARGS --{a.name}"] = a.field
    return out


def annotate(d: Difference, fields: Dict[str, str]) -> Difference:
    if d.file == BACKENDS:
        return dataclasses.replace(d, yaml=_backend_field(d.key))
    if d.file == RESOLVED:
        return dataclasses.replace(d, yaml=d.key)
    return dataclasses.replace(d, yaml=fields.get(f"{d.file}:{d.key}"))


# --- comparing ------------------------------------------------------------------------------------

def differences(a: Dict[str, Dict[str, str]], b: Dict[str, Dict[str, str]]) -> List[Difference]:
    out = []
    for file in a:
        keys = list(a[file]) + [k for k in b[file] if k not in a[file]]
        out += [Difference(file, k, a[file].get(k), b[file].get(k)) for k in keys if a[file].get(k) != b[file].get(k)]
    return out


def compare(files_a: Dict[str, str], files_b: Dict[str, str]) -> dict:
    ignored = list(NOT_SETTINGS)
    fields = {**yaml_fields(files_b), **yaml_fields(files_a)}
    diffs = [annotate(d, fields) for d in differences(settings(files_a, ignored), settings(files_b, ignored))]
    hashes = [config_hash(f[RunLayout.CONFIG_ENV]) for f in (files_a, files_b)]
    return {"identical": not diffs, "config_hash": {"a": hashes[0], "b": hashes[1], "differs": hashes[0] != hashes[1]},
            "ignored_yaml_keys": ignored, "differences": [dataclasses.asdict(d) for d in diffs]}


def _short(value: Optional[str], width: int = 60) -> str:
    text = "(absent)" if value is None else value
    return text if len(text) <= width else text[:width - 3] + "..."


def render_text(result: dict, a: str, b: str) -> str:
    h = result["config_hash"]
    lines = [f"A: {a}", f"B: {b}"]
    if h["differs"]:
        lines.append(f"config hash differs: {(h['a'] or '?')[:12]} -> {(h['b'] or '?')[:12]} "
                     "(header comments are not compared)")
    diffs = result["differences"]
    if not diffs:
        return "\n".join(lines + ["identical settings"]) + "\n"
    lines.append(f"{len(diffs)} setting(s) differ:")
    for file in dict.fromkeys(d["file"] for d in diffs):
        lines.append(f"  {file}")
        for d in (d for d in diffs if d["file"] == file):
            origin = f"   [yaml: {d['yaml']}]" if d["yaml"] and file != RESOLVED else ""
            lines.append(f"    {d['key']}: {_short(d['a'])} -> {_short(d['b'])}{origin}")
    return "\n".join(lines) + "\n"


def diff_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sd3exp diff", description="Compare two run folders or experiment specs setting by setting. "
        "Exit status: 0 identical, 1 different, 2 error.")
    parser.add_argument("a", help='a run folder, or an experiment spec such as "fantasy_art lora.rank=32"')
    parser.add_argument("b", help="the same, for the other side")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--conf", type=Path, default=CONF_DIR, help="config directory for specs (default: conf/)")
    args = parser.parse_args(argv)
    result = compare(operand_files(args.a, args.conf), operand_files(args.b, args.conf))
    print(json.dumps(result, indent=2) if args.format == "json" else render_text(result, args.a, args.b), end="")
    return 0 if result["identical"] else 1
