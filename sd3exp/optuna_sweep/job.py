"""The trial's side of an Optuna sweep, in the job's process: report each evaluated checkpoint's
objective to the trial (`sweep.optuna.*`, appended by the sweeper) and ask the study's pruner.

The job reconnects to the trial the sweeper asked for with `optuna.trial.Trial(study, trial_id)` (what
`Study.ask` itself returns; the study loaded with `optuna.load_study` and the pruner the sweeper stored in
the study's user attribute `sd3exp_pruner`, so both sides prune alike). The sampler is a RandomSampler:
the trial's parameters are already set, nothing is sampled here. `sweep.optuna.storage=env:NAME` (what
the sweeper passes when the URL holds a password) is the URL in the environment variable NAME.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from sd3exp.schema import OptunaTrialConfig

if TYPE_CHECKING:
    from sd3exp.live.state import Point


class TrialReporter:
    """Reports objectives to one trial of a study and says when it is pruned."""

    def __init__(self, where: OptunaTrialConfig) -> None:
        import optuna

        from sd3exp.optuna_sweep import PRUNER_ATTR, make_pruner, masked, resolve_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # the sweeper sets it with the trial; Optuna refuses "" and the summary names it
        storage = resolve_storage(where.storage or "", "sweep.optuna.storage")
        probe = optuna.load_study(study_name=where.study, storage=storage)
        self.study = optuna.load_study(study_name=where.study, storage=storage,
                                       sampler=optuna.samplers.RandomSampler(),
                                       pruner=make_pruner(probe.user_attrs.get(PRUNER_ATTR)))
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == where.trial), None)
        if frozen is None:
            from sd3exp.errors import ConfigError

            raise ConfigError("sweep.optuna.trial", where.trial, f"no such trial in study {where.study!r} ({masked(storage)})",
                              "leave sweep.optuna.* to the sd3exp Optuna sweeper")
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)
        self.number = where.trial
        self.pruner = type(self.study.pruner).__name__
        self.reported = set(frozen.intermediate_values)

    @property
    def maximize(self) -> bool:
        import optuna

        return self.study.direction == optuna.study.StudyDirection.MAXIMIZE

    def report(self, step: int, value: Optional[float]) -> None:
        """One checkpoint's objective (a missing or non-finite score is not reported)."""
        if step in self.reported or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step)
        self.reported.add(step)

    def report_all(self, points: Sequence[Point]) -> None:
        """Every checkpoint's objective not reported yet, in step order."""
        for point in sorted(points, key=lambda p: p.step):
            self.report(point.step, point.value)

    def should_prune(self) -> bool:
        return bool(self.reported) and self.trial.should_prune()

    def mark_pruned(self, record: Dict[str, Any]) -> None:
        """Tell the sweeper (through the storage) that the pruner stopped this trial."""
        from sd3exp.optuna_sweep import PRUNED_ATTR

        self.trial.set_user_attr(PRUNED_ATTR, record)
