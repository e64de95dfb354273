"""A run folder's identity, and the guards that keep earlier runs intact.

`run.json` records which resolved config a run folder belongs to. The same
config again resumes; a different one is refused unless the user asks for a
new folder (trainer.new_run) or forces it (trainer.force), and a forced
recompile first archives the earlier compiled files under `history/`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser

from sd3exp import console
from sd3exp.errors import DiskFullError, RunConflictError, no_space_message
from sd3exp.io import atomic_dir, read_json, stale_temporary, write_bytes, write_if_changed, write_json
from sd3exp.layout import RunLayout
from sd3exp.stage_table import CONFIG_FOLDER, RUN_FOLDER, STAGES

# Settings that say where and how to run, not what to train: left out of the config hash.
INVOCATION_KEYS = ("paths", "stage", "eval", "captioner", "tracking", "sweep", "dataset.prepared_dir", "dataset.cache_dir", "trainer.simpletuner", "trainer.home", "trainer.new_run",
                   "trainer.force", "trainer.cpu_shim")
# command-line keys that pick what to run, how or where, not what is trained
NOT_SETTINGS = INVOCATION_KEYS + ("experiment", "hparams_search", "hydra")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class RunRecord:
    experiment: str
    overrides: str
    config_hash: str
    sd3exp_version: str


def is_setting(key: str) -> bool:
    """Whether a config key (or group) changes what is trained."""
    return not any(key == p or key.startswith((p + ".", p + "/")) for p in NOT_SETTINGS)


def training_overrides(task: List[str]) -> str:
    """The command line's overrides that change what is trained, `k=v,k2=v2`, sorted: they name the
    run folder and are recorded in its files (eval.*, stage, paths.* and the like are left out)."""
    parsed = OverridesParser.create().parse_overrides(list(task))
    return ",".join(sorted(o.input_line for o in parsed if o.input_line is not None and is_setting(o.key_or_group)))


# The locks: folder locked, inside the run folder -> what its holder is doing (the stages that take
# each: sd3exp/stage_table.py).
# Evaluation locks config/, not the run folder, so a run can be evaluated while it trains; no lock
# file is written either way.
LOCKS = {RUN_FOLDER: "preparing or training", CONFIG_FOLDER: "evaluating"}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def exclusive(run_dir: Path, stage: str) -> Iterator[None]:
    """Hold the locks `stage` needs: two sd3exp processes never prepare or train the same run at
    once, nor evaluate it at once; evaluating while another process trains is allowed."""
    fds = []
    try:
        for folder in STAGES[stage].locks:
            fds.append(os.open(run_dir / folder, os.O_RDONLY))
            if not _try_lock(fds[-1]):
                raise RunConflictError(f"another sd3exp process is {LOCKS[folder]} {run_dir}. Fix: wait for it "
                                       "to finish, or stop it first.")
        yield
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def waiting_lock(folder: Path, doing: str) -> Iterator[None]:
    """Hold `folder`'s lock, waiting for it: sd3exp jobs that start at once (a Slurm sweep) take
    turns at filling a folder they share (the demo assets, a shared cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if not _try_lock(fd):
            console.info(f"waiting for another sd3exp job {doing} {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def training_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run's training lock right now."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(training_dir: Path) -> Dict[int, Path]:
    """Complete `checkpoint-N` folders by step (SimpleTuner's `-tmp` folders excluded)."""
    if not training_dir.is_dir():
        return {}
    found = {}
    for p in training_dir.iterdir():
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def set_aside_unfinished(training_dir: Path, guard: Optional[str]) -> List[Tuple[Path, Path]]:
    """Move `checkpoint-N` folders whose save never finished (no `guard` file, which SimpleTuner
    writes last) into `unfinished-checkpoints/`, where resuming cannot pick them. Nothing is deleted."""
    if not guard:
        return []
    aside = RunLayout(training_dir, training_dir).unfinished
    moved = []
    for path in checkpoint_dirs(training_dir).values():
        if not (path / guard).exists():
            target = aside / path.name
            n = 2
            while target.exists():
                target, n = aside / f"{path.name}.{n}", n + 1
            aside.mkdir(exist_ok=True)
            os.rename(path, target)
            moved.append((path, target))
    return moved


def read_record(run_dir: Path) -> Optional[RunRecord]:
    """The folder's sd3exp run record; None without one (a `run.json` sd3exp did not write included)."""
    path = RunLayout(run_dir).record
    try:
        data = read_json(path) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(RunRecord)}:
        return None
    return RunRecord(**data)


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def own_record_left(path: Path) -> bool:
    """The temporary run.json of an sd3exp killed while it wrote it, the first file it writes in a new run
    folder (write_run): a folder holding only that is sd3exp's, and the next write_run removes it."""
    return path.name.startswith(f".{RunLayout.RECORD}.") and stale_temporary(path)


def check_not_foreign(run_dir: Path, training_dir: Optional[Path] = None) -> None:
    """Refuse a run folder that holds files but no sd3exp run record: they are the user's. Evaluation
    passes `training_dir`: checkpoints it only reads may be all that a folder holds."""
    read_only = {training_dir.resolve()} if training_dir else set()
    if run_dir.is_dir() and read_record(run_dir) is None and any(
            p.resolve() not in read_only and not own_record_left(p) for p in run_dir.iterdir()):
        raise RunConflictError(
            f"the run folder {run_dir} is not empty and is not an sd3exp run folder (no {RunLayout.RECORD}); it holds "
            f"{_listing(run_dir)}, which sd3exp would overwrite. Fix: point hydra.run.dir at a new or empty "
            "folder, or leave hydra.run.dir out to use the default under paths.output_root.")


def check_apart(run_dir: Path, concepts: List[Tuple[str, Path]]) -> None:
    """Refuse a run folder equal to, inside or around a concept's image folder."""
    run = run_dir.resolve()
    for field_name, path in concepts:
        folder = path.resolve()
        if run == folder or folder in run.parents or run in folder.parents:
            where = "is" if run == folder else "is inside" if folder in run.parents else "contains"
            raise RunConflictError(
                f"the run folder {run} {where} {field_name}={folder}: sd3exp would write its files among the "
                "images (or train on its own output). Fix: keep the run folder (hydra.run.dir) and the image "
                "folders apart.")


def next_free(run_dir: Path) -> Path:
    n = 2
    while Path(f"{run_dir}-{n}").exists():
        n += 1
    return Path(f"{run_dir}-{n}")


def training_owner(training_dir: Path) -> Optional[str]:
    """The run folder that trained into `training_dir` (as recorded then), or None when sd3exp did not."""
    owner = RunLayout(training_dir, training_dir).owner
    return owner.read_text().strip() if owner.is_file() else None


def note_training_owner(training_dir: Path, run_dir: Path) -> None:
    """Evaluation only reads checkpoints: say whose they are when they are not this run folder's."""
    claimed = training_owner(training_dir)
    if not checkpoint_dirs(training_dir) or claimed == str(run_dir.resolve()):
        return
    whose = f"of the run folder {claimed} (moved or copied since)" if claimed else "sd3exp did not train (no " \
        f"{RunLayout.OWNER} file: SimpleTuner run by hand?)"
    console.info(f"evaluating checkpoints in {training_dir} {whose}; they are only read")


def check_training_owner(training_dir: Path, run_dir: Path) -> None:
    """Refuse a training folder whose checkpoints belong to another run."""
    if not checkpoint_dirs(training_dir):
        return
    claimed = training_owner(training_dir)
    if claimed != str(run_dir.resolve()):
        raise RunConflictError(
            f"paths.training_dir={training_dir} already holds checkpoints of "
            f"{'another run (' + claimed + ')' if claimed else 'a run sd3exp did not start'}; "
            "training here would mix with or delete them. Fix: leave paths.training_dir at its default "
            "(inside the run folder) or point it at an empty folder.")


def claim_training_dir(training_dir: Path, run_dir: Path) -> None:
    training_dir.mkdir(parents=True, exist_ok=True)
    owner = RunLayout(training_dir, training_dir).owner
    if not owner.exists():
        write_bytes(owner, f"{run_dir.resolve()}\n".encode())


def resolve_run_dir(run_dir: Path, record: RunRecord, training_dir: Path, force: bool, new_run: bool,
                    plan_change: Optional[str] = None, reading: bool = False) -> Path:
    """The folder this invocation may write to: `run_dir`, or a fresh sibling for trainer.new_run.
    `plan_change` says how the images changed the plan of the same config (None: they did not).
    `reading` (eval, report): checkpoints are only read, so whoever trained them is accepted, and a
    dataset changed since training does not matter."""
    check_not_foreign(run_dir, training_dir if reading else None)
    previous = read_record(run_dir)
    if new_run and previous is not None:
        return next_free(run_dir)
    started = bool(checkpoint_dirs(training_dir))
    trained = started or RunLayout(run_dir).training_summary.is_file()
    if previous is None or (previous.config_hash == record.config_hash
                            and not (plan_change and trained and not reading)):
        (note_training_owner if reading else check_training_owner)(training_dir, run_dir)
        return run_dir
    if force:
        archive(run_dir, previous)
        if trained and previous.config_hash != record.config_hash:
            set_aside_training(run_dir, training_dir, previous)
        return run_dir
    if previous.config_hash == record.config_hash:
        raise RunConflictError(
            f"the dataset of {run_dir} changed after training started ({plan_change}); resuming would train "
            "one run on two datasets and never reach the new plan. Fix: add trainer.new_run=true to train the "
            "new dataset in a new run folder beside it, or trainer.force=true to continue this run with the new "
            "plan (its compiled files are archived under history/ first; checkpoints are kept).")
    raise RunConflictError(
        f"{run_dir} belongs to a different configuration of '{previous.experiment}' "
        f"(config {previous.config_hash[:12]}, now {record.config_hash[:12]})"
        f"{' and already has checkpoints' if started else ''}. Fix: add trainer.new_run=true to start a new "
        "run folder beside it, or trainer.force=true to train the new config afresh in this folder "
        "(its compiled files and trained weights are moved under history/ first, never deleted).")


def free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... : the first that does not exist."""
    return next(p for p in [path, *(path.with_name(f"{path.name}.{n}") for n in range(2, 10_000))] if not p.exists())


def set_aside_training(run_dir: Path, training_dir: Path, previous: RunRecord) -> List[Path]:
    """Move what was trained for `previous` (the training folder with SimpleTuner's own config, its
    log and summary, its evaluation) beside that config's archived files, never deleting any, so a
    forced run of a new config trains afresh and nothing in the run folder describes weights it did
    not train. Returns where each went."""
    history = RunLayout(run_dir).history(previous.config_hash)
    inside = run_dir.resolve() in training_dir.resolve().parents
    moves = [(run_dir / name, history / name) for name in RunLayout.TRAINED if (run_dir / name).exists()]
    if training_dir.is_dir():  # paths.training_dir outside the run folder: set aside where it is
        moves.append((training_dir, history / RunLayout.TRAINING if inside
                      else training_dir.with_name(f"{training_dir.name}.{previous.config_hash[:12]}")))
    moved = []
    for src, dest in moves:
        dest = free_name(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)
        moved.append(dest)
    if moved:
        console.info(f"trainer.force: what config {previous.config_hash[:12]} trained was moved aside "
                     f"({', '.join(map(str, moved))}); this run trains afresh")
    return moved


def archive(run_dir: Path, previous: RunRecord) -> None:
    """Copy the earlier compiled files under history/<config>/, each whole or not at all."""
    dest = RunLayout(run_dir).history(previous.config_hash)
    for name in RunLayout.ARCHIVED:
        src = run_dir / name
        if not src.exists() or (dest / name).exists():
            continue
        try:
            if src.is_dir():
                with atomic_dir(dest / name, replace=False) as build:
                    shutil.copytree(src, build, dirs_exist_ok=True)
            else:
                write_bytes(dest / name, src.read_bytes())
        except (OSError, shutil.Error, DiskFullError) as err:
            if not isinstance(err, DiskFullError) and "No space left on device" not in str(err) \
                    and getattr(err, "errno", None) != errno.ENOSPC:
                raise
            raise DiskFullError(f"{no_space_message(dest)}; archiving the earlier {name} failed, "
                                "the run's files are unchanged") from err


def write_record(run_dir: Path, record: RunRecord) -> None:
    path = RunLayout(run_dir).record
    if not path.is_file() or read_record(run_dir) != record:
        write_json(path, asdict(record))


def written(run_dir: Path, files: Dict[str, str]) -> List[str]:
    """Write the compiled files; the relative paths that changed."""
    return [rel for rel, text in files.items() if write_if_changed(run_dir / rel, text)]
