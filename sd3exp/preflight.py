"""Before training: SimpleTuner's own parser reads the compiled run, and the data
backend list is checked. Errors are reported in the experiment's terms."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Sequence

from sd3exp.compile import Arg
from sd3exp.errors import TrainerError
from sd3exp.io import read_json, write_json
from sd3exp.layout import RunLayout
from sd3exp.project import WORKERS
from sd3exp.trainer_env import TrainerEnv

WORKER = WORKERS / "check_config.py"
MARKER = "SD3EXP-PREFLIGHT "


def backend_problems(run_dir: Path) -> List[str]:
    """Problems in config/multibackend.json that SimpleTuner would only hit mid-start."""
    backends = read_json(RunLayout(run_dir).multibackend)
    ids = [b["id"] for b in backends]
    problems = [f"dataset id '{i}' is used twice" for i in sorted(set(ids)) if ids.count(i) > 1]
    defaults = [b["id"] for b in backends if b.get("dataset_type") == "text_embeds" and b.get("default")]
    if len(defaults) != 1:
        problems.append(f"expected exactly one default text-embed cache, found {defaults or 'none'}")
    for b in backends:
        folder = b.get("instance_data_dir")
        if folder and not (run_dir / folder).is_dir():
            problems.append(f"dataset '{b['id']}': instance_data_dir {run_dir / folder} does not exist "
                            "(run stage=prepare first)")
    return problems


def field_for(error: str, args: Sequence[Arg]) -> str:
    """The experiment field behind a SimpleTuner error: the first argument named in it
    (as --name, or as words such as 'Optimizer'), else the first whose value it quotes."""
    text = error.lower()
    words = set(re.findall(r"[\w.-]+", text))
    tests = (lambda a: f"--{a.name}" in text,
             lambda a: a.name in words or a.name.replace("_", " ") in text,
             lambda a: isinstance(a.value, str) and len(a.value) > 2 and a.value.lower() in words)
    for test in tests:
        for a in args:
            if test(a):
                return a.field
    return ""


def mismatches(parsed: Dict[str, Any], args: Sequence[Arg]) -> List[str]:
    """Arguments SimpleTuner read differently from what was compiled."""
    out = []
    for a in args:
        if a.name not in parsed or isinstance(a.value, bool):
            continue
        got = parsed[a.name]
        same = (math.isclose(float(got), float(a.value)) if isinstance(a.value, (int, float)) and got is not None
                else str(got) == str(a.value))
        if not same:
            out.append(f"{a.field}: compiled {a.name}={a.value!r}, SimpleTuner read {got!r}")
    return out


def run_parsers(env: TrainerEnv, run_dirs: Sequence[Path]) -> List[dict]:
    """SimpleTuner's parse of each run folder, in one trainer process (its import is most of the time)."""
    first = run_dirs[0]
    proc = subprocess.run([str(env.python), str(WORKER), *map(str, run_dirs)], cwd=first, capture_output=True,
                          text=True, env={"PATH": f"{env.bin}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                          "HF_HOME": str(first / ".hf"), "MPLCONFIGDIR": str(first / ".mpl")})
    results = [json.loads(ln[len(MARKER):]) for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if len(results) != len(run_dirs):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise TrainerError(f"SimpleTuner's config parser did not run with {env.python}:\n{tail}")
    return results


def run_parser(env: TrainerEnv, run_dir: Path) -> dict:
    return run_parsers(env, [run_dir])[0]


def cache_key(env: TrainerEnv, run_dir: Path) -> str:
    """What a successful parse depends on: the compiled files, the trainer and the machine."""
    h = hashlib.sha256(f"{env.python}\0{env.version}\0{platform.node()}".encode())
    for rel in RunLayout.COMPILED:
        path = run_dir / rel
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def error_summary(error: str) -> str:
    """argparse's own `prog: error: ...` line(s) instead of the full usage dump."""
    lines = [ln.split("error:", 1)[1].strip() for ln in error.splitlines() if ": error:" in ln]
    return "; ".join(lines) if lines else error.strip()[-800:]


def preflight(env: TrainerEnv, run_dir: Path, args: Sequence[Arg]) -> dict:
    """Parse the run with SimpleTuner's code; raise TrainerError naming the YAML field on problems.

    A success is remembered in the run folder, so a resumed run does not parse again."""
    problems = backend_problems(run_dir)
    if problems:
        raise TrainerError("data backends (multibackend.json): " + "; ".join(problems))
    key, cache = cache_key(env, run_dir), RunLayout(run_dir).preflight
    if cache.is_file() and read_json(cache)["key"] == key:
        return read_json(cache)["result"]
    result = run_parser(env, run_dir)
    if not result["ok"]:
        field = field_for(result["error"], args)
        where = f" (experiment field: {field})" if field else ""
        raise TrainerError(f"SimpleTuner rejected the compiled config{where}: {error_summary(result['error'])}")
    wrong = mismatches(result["args"], args)
    if wrong:
        raise TrainerError("SimpleTuner would read the config differently from what was compiled: " + "; ".join(wrong))
    write_json(cache, {"key": key, "result": {"ok": True, "cuda": result["cuda"],
                                           "checkpoint_guard": result["checkpoint_guard"]}})
    return result
