"""Make checkpoints visible to ComfyUI without copying them.

Either symlinks `<models>/unet/<run>/checkpoint-N-<stamp>.safetensors` (LoRA:
`<models>/loras/<run>/...`; the stamp changes with the file, so ComfyUI never
serves a cached older version under the same name), planned by a pure function
from what is on disk now, or an `extra_model_paths.yaml` entry that adds the run folder itself.
Nothing is ever overwritten: conflicts and broken links are reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import Checkpoint

LinkMode = Literal["symlink", "extra_paths"]
MODEL_FOLDERS = {"full": "unet", "lora": "loras"}
EXTRA_PATHS_KEYS = {"full": "diffusion_models", "lora": "loras"}
STAMP_LEN = 10


@dataclass(frozen=True)
class Existing:
    """What is at a link path now."""

    kind: Literal["absent", "link", "file"]
    target: Optional[Path] = None  # where a link points (resolved)
    target_exists: bool = False
    same: bool = False  # already the checkpoint's file


@dataclass(frozen=True)
class LinkAction:
    """One planned or reported link; `problem` is True for conflicts and broken links."""

    action: Literal["create", "skip", "conflict", "broken", "remove"]
    link: Path
    target: Optional[Path]
    message: str

    @property
    def problem(self) -> bool:
        return self.action in ("conflict", "broken")


def stamp(path: Path) -> str:
    """A short id of a checkpoint file's version (size and mtime, as the evaluation's reuse judges a
    change): a changed file gets a new link name, so ComfyUI's node cache, keyed by the name, reloads it."""
    info = Path(path).stat()
    return hashlib.sha1(f"{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:STAMP_LEN]


def link_name(checkpoint: Checkpoint, run: str) -> str:
    """`<run>/<label>-<stamp>.safetensors`: the symlink's path inside ComfyUI's unet or loras folder."""
    return f"{run}/{checkpoint.label}-{stamp(checkpoint.path)}.safetensors"


def superseded(folder: Path, label: str, target: Path, keep: Path) -> list[Path]:
    """Our links to `target` for an earlier version of the file (`<label>[-<stamp>].safetensors`)."""
    pattern = re.compile(re.escape(label) + rf"(-[0-9a-f]{{{STAMP_LEN}}})?\.safetensors")
    return sorted(p for p in folder.iterdir() if p != keep and p.is_symlink() and pattern.fullmatch(p.name)
                  and Path(os.path.realpath(p)) == target) if folder.is_dir() else []


def comfy_name(checkpoint: Checkpoint, run: str, mode: LinkMode, out_dir: Path | str) -> str:
    """The name ComfyUI lists for a checkpoint (with `/`; match it against /object_info)."""
    if mode == "symlink":
        return link_name(checkpoint, run)
    return Path(checkpoint.path).relative_to(out_dir).as_posix()


def link_path(checkpoint: Checkpoint, run: str, models_dir: Path) -> Path:
    """Where the symlink for a checkpoint goes under ComfyUI's models folder."""
    return models_dir / MODEL_FOLDERS[checkpoint.kind] / link_name(checkpoint, run)


def plan_action(link: Path, target: Path, now: Existing) -> LinkAction:
    """Decide what to do for one link given what is there now (pure)."""
    if now.kind == "absent":
        return LinkAction("create", link, target, f"link {link} -> {target}")
    if now.same:
        return LinkAction("skip", link, target, f"{link} already points at {target}")
    if now.kind == "link" and not now.target_exists:
        return LinkAction(
            "broken", link, now.target, f"{link} is a broken link to {now.target}; remove it to link {target}"
        )
    return LinkAction(
        "conflict", link, target, f"{link} exists and is not {target}; not overwritten (remove or rename it)"
    )


def plan_links(
    wanted: Mapping[Path, Path], existing: Mapping[Path, Existing], stray_broken: Sequence[Path] = ()
) -> list[LinkAction]:
    """Actions for wanted links (link -> target), plus other broken links found in the run folders."""
    actions = [plan_action(link, target, existing[link]) for link, target in wanted.items()]
    return actions + [
        LinkAction("broken", p, None, f"{p} is a broken link (checkpoint deleted?); remove it")
        for p in stray_broken
        if p not in wanted
    ]


def inspect(link: Path, target: Path) -> Existing:
    """Read what is at `link` now."""
    if not os.path.lexists(link):
        return Existing("absent")
    exists = link.exists()
    same = exists and os.path.samefile(link, target)
    if link.is_symlink():
        return Existing("link", Path(os.path.realpath(link)), exists, same)
    return Existing("file", link, True, same)


def broken_links(folder: Path) -> list[Path]:
    """Symlinks in `folder` whose target is gone."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_symlink() and not p.exists())


def link_checkpoints(checkpoints: Sequence[Checkpoint], models_dir: Path | str, run: str) -> list[LinkAction]:
    """Create the missing symlinks; return every action, problems included."""
    models_dir = Path(models_dir)
    wanted = {link_path(c, run, models_dir): c.path.resolve() for c in checkpoints}
    existing = {link: inspect(link, target) for link, target in wanted.items()}
    folders = {link.parent for link in wanted}
    actions = plan_links(wanted, existing, [p for f in sorted(folders) for p in broken_links(f)])
    for action in actions:
        if action.action == "create" and action.target is not None:  # a create always has its target
            action.link.parent.mkdir(parents=True, exist_ok=True)
            action.link.symlink_to(action.target)
    for c in checkpoints:
        link = link_path(c, run, models_dir)
        for old in superseded(link.parent, c.label, wanted[link], link):
            old.unlink()
            actions.append(LinkAction("remove", old, wanted[link], f"{old}: link of an earlier version of "
                                      f"{wanted[link]}, replaced by {link.name}"))
    return actions


def extra_paths_yaml(run: str, out_dir: Path | str, kinds: Sequence[str]) -> str:
    """An extra_model_paths.yaml entry that makes ComfyUI scan the run folder itself."""
    lines = [f"{json.dumps('sd3exp_' + run)}:", f"  base_path: {json.dumps(str(Path(out_dir).resolve()))}"]
    lines += [f"  {EXTRA_PATHS_KEYS[k]}: ." for k in sorted(set(kinds))]
    return "\n".join(lines) + "\n"


def write_extra_paths(path: Path | str, text: str) -> bool:
    """Write the YAML; False if identical already; EvalError if a different file is there."""
    path = Path(path)
    if path.exists():
        if path.read_text() == text:
            return False
        raise EvalError(f"{path} exists with other content; not overwritten. Merge this into it:\n{text}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True
