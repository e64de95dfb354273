"""The stages (`stage=...`), once: what each runs, what it needs and which locks it holds.

Every stage first plans; all but `plan` then compile the run folder; `steps` are the stages whose
function (`stage_<step>` in sd3exp/stages.py) runs after that. validate, the pipeline, the run
folder's locks and `sd3exp --help` read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from sd3exp.layout import RunLayout

RUN_FOLDER, CONFIG_FOLDER = "", RunLayout.CONFIG  # the locks (sd3exp/runfolder.py): the run folder, its config/


@dataclass(frozen=True)
class Stage:
    name: str
    steps: Tuple[str, ...] = ()  # the stages run after compile (their stage_<name> functions)
    needs_data: bool = False  # reads the concept folders
    needs_model: bool = False  # uses the base model (a demo builds it first)
    reads_checkpoints: bool = False  # only reads checkpoints, whoever trained them
    locks: Tuple[str, ...] = ()  # folders held while it runs (RUN_FOLDER, CONFIG_FOLDER)
    compiles: bool = True  # writes the run folder
    summary: bool = False  # ends with what the run produced, and where

    @property
    def evaluates(self) -> bool:
        return "eval" in self.steps


TABLE: Tuple[Stage, ...] = (
    Stage("plan", compiles=False),
    Stage("compile"),
    Stage("caption", ("caption",), needs_data=True),
    Stage("review", ("review",), needs_data=True),
    Stage("audit", ("audit",), needs_data=True, locks=(RUN_FOLDER,)),  # reads images and captions only
    Stage("prepare", ("prepare",), needs_data=True, needs_model=True, locks=(RUN_FOLDER,)),
    Stage("train", ("train",), needs_data=True, needs_model=True, locks=(RUN_FOLDER,)),
    Stage("eval", ("eval",), needs_model=True, reads_checkpoints=True, locks=(CONFIG_FOLDER,)),
    Stage("report", ("report",), reads_checkpoints=True, locks=(CONFIG_FOLDER,)),
    Stage("all", ("train", "eval"), needs_data=True, needs_model=True, locks=(RUN_FOLDER, CONFIG_FOLDER),
          summary=True),
)
STAGES: Dict[str, Stage] = {s.name: s for s in TABLE}


def names() -> str:
    """The stage names for the help text: `plan, compile, ..., all (default)`."""
    return ", ".join(s.name + (" (default)" if s.name == "all" else "") for s in TABLE)
