"""`sd3exp lock [--check]`: a reviewable snapshot of what every shipped experiment compiles to.

`compiled/<experiment>/` holds config/config.env, config/multibackend.json,
config/config.json and plan.json, compiled with the project root at a fixed
placeholder, a fixed run folder and no machine-local config (conf/local), so the
snapshot is byte-identical on every clone. `--check` recompiles in memory and
fails when a YAML, template or the compiler changed without re-locking.
"""

from __future__ import annotations

import argparse
import difflib
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

from sd3exp import console
from sd3exp.compile import config_hash
from sd3exp.experiment import to_dict
from sd3exp.io import atomic_dir, write_text
from sd3exp.job import compiled_files, compose_job
from sd3exp.layout import RunLayout
from sd3exp.project import ROOT

PLACEHOLDER_ROOT = "/sd3exp-root"
LOCK_DIR = "compiled"
DIFF_LINES = 20


def experiments(conf_dir: Path) -> List[str]:
    return sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))


def snapshot(conf_dir: Path, experiment: str) -> Dict[str, str]:
    """The locked files of one experiment, compiled in memory.

    The project root is a temporary folder (a `demo: true` experiment generates
    its dataset there), written as PLACEHOLDER_ROOT, and the config hash is the
    one a compile at PLACEHOLDER_ROOT would record.
    """
    with tempfile.TemporaryDirectory(prefix="sd3exp-lock-") as tmp:
        root = str(Path(tmp).resolve())
        overrides = [f"experiment={experiment}", "~local", f"paths.root_dir={root}"]
        job = compose_job(conf_dir, overrides, Path(root) / "outputs" / experiment)
        resolved = job.resolved_yaml.replace(root, PLACEHOLDER_ROOT)
        sha = config_hash(to_dict(OmegaConf.create(resolved)))
        files = compiled_files(replace(job, overrides="", config_hash=sha))  # the lock's own overrides are not settings
        return {rel: files[rel].replace(root, PLACEHOLDER_ROOT) for rel in RunLayout.SETTINGS_FILES}


def on_disk(folder: Path) -> Dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def first_difference(name: str, want: Dict[str, str], have: Dict[str, str]) -> str:
    """Why `have` is not `want`: the first differing file as a few lines of unified diff."""
    for rel in sorted(set(want) | set(have)):
        if rel not in have:
            return f"{name}: {rel} is missing from the snapshot"
        if rel not in want:
            return f"{name}: {rel} is in the snapshot but no longer compiled"
        if want[rel] != have[rel]:
            lines = difflib.unified_diff(have[rel].splitlines(), want[rel].splitlines(),
                                         f"{LOCK_DIR}/{name}/{rel} (locked)", f"{rel} (compiled now)", n=0, lineterm="")
            return f"{name}: {rel} differs\n" + "\n".join(list(lines)[:DIFF_LINES])
    return ""


def problems(root: Path) -> List[str]:
    conf, lock = root / "conf", root / LOCK_DIR
    names = experiments(conf)
    found = [f"{name}: no snapshot in {LOCK_DIR}/{name} (run `sd3exp lock`)"
             for name in names if not (lock / name).is_dir()]
    found += [first_difference(name, snapshot(conf, name), on_disk(lock / name))
              for name in names if (lock / name).is_dir()]
    stale = sorted(p.name for p in lock.iterdir() if p.is_dir() and p.name not in names) if lock.is_dir() else []
    found += [f"{name}: {LOCK_DIR}/{name} is stale (no conf/experiment/{name}.yaml)" for name in stale]
    return [p for p in found if p]


def write_lock(root: Path) -> List[str]:
    """Recreate compiled/ from scratch; the experiments written."""
    names = experiments(root / "conf")
    with atomic_dir(root / LOCK_DIR) as staged:
        for name in names:
            for rel, text in snapshot(root / "conf", name).items():
                write_text(staged / name / rel, text)
    return names


def lock_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sd3exp lock", description=f"Snapshot what every conf/experiment/*.yaml compiles to into {LOCK_DIR}/.")
    parser.add_argument("--check", action="store_true",
                        help="fail (exit 1) if the snapshot is not what the experiments compile to now")
    parser.add_argument("--root", type=Path, default=ROOT, help="project folder holding conf/ and compiled/")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not args.check:
        names = write_lock(root)
        console.info(f"locked {len(names)} experiment(s) into {root / LOCK_DIR}: {', '.join(names)}")
        return 0
    found = problems(root)
    for problem in found:
        console.info(problem)
    if found:
        console.info(f"\n{LOCK_DIR}/ is out of date: review the changes, then run `sd3exp lock` and commit "
                     f"{LOCK_DIR}/.")
        return 1
    console.info(f"{LOCK_DIR}/ matches all {len(experiments(root / 'conf'))} experiment(s)")
    return 0
