"""sd3exp's Optuna sweeper: `hparams_search=optuna_*` on a current Optuna (>= 4), with pruning.

The sweeper (one entry: `OptunaSweeper`, reached by Hydra through hydra_plugins/sd3exp_optuna) asks a
study for trials, launches each batch of `n_jobs` through Hydra's launcher (basic, submitit local,
Slurm: unchanged), and tells the study each trial's end. The study lives in an Optuna storage: SQLite
in the sweep folder by default (`sqlite:///<sweep dir>/optuna.db`), or `hydra.sweeper.storage=<URL>`
(MariaDB / PostgreSQL) that Slurm jobs share. Each job learns its trial from three overrides the
sweeper appends (`sweep.optuna.storage/study/trial`, settings of how to run, not of what is trained:
they change neither the run's compiled files nor its identity) and, while it trains, reports each
evaluated checkpoint's objective to that trial and stops when the study's pruner says so
(sd3exp/optuna_sweep/job.py, called by the live watcher). A pruned trial keeps its checkpoints and
scores; the job sets the trial's user attribute `sd3exp_pruned` and the sweeper tells the study PRUNED.

A storage URL's password is never printed nor written (docs/sweeps.md "Sharing a study on a cluster"):
the console, trials.json and Hydra's own config (hydra.yaml, the job pickles submitit writes) get the
URL with `***` for it, and jobs get `sweep.optuna.storage=env:SD3EXP_OPTUNA_STORAGE`, the environment
variable the sweeper sets to the full URL (Slurm hands the submitting process's environment to its
jobs, requeued ones included). `hydra.sweeper.storage=env:NAME` reads the URL from NAME instead.

Trials already finished in the storage (complete, pruned, failed) count toward `n_trials`, so the same
command run again continues the study. Trials left RUNNING by a sweep process that died (SIGKILL, a
lost login node) are resumed, not failed: launched again with the same trial number, parameters and
job number, so the job's run folder resumes from its checkpoints and goes on reporting to the same
trial. One sweep process drives a study at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple, cast

from omegaconf import DictConfig, OmegaConf

from sd3exp import console
from sd3exp.errors import ConfigError

if TYPE_CHECKING:
    import optuna

PRUNED_ATTR = "sd3exp_pruned"  # trial user attribute the job sets when the pruner stopped it
PRUNER_ATTR = "sd3exp_pruner"  # study user attribute: the pruner's config, read by each job

STORAGE_ENV = "SD3EXP_OPTUNA_STORAGE"  # the full storage URL, for the jobs, when it holds a password
ENV_PREFIX = "env:"  # a storage given as `env:NAME`: the URL is NAME's value

PRUNERS = ("none", "median", "successive_halving", "hyperband")
SAMPLERS = ("tpe", "random", "grid")


def distribution(override: Any) -> Any:
    """The Optuna distribution of one parsed sweep override, as hydra-optuna-sweeper maps them:
    `choice(a, b)` / `a,b` -> categorical; `range(a, b, step=s)` -> int (float when any bound is a
    float) with that step, both ends inclusive (shuffled: categorical); `interval(a, b)` -> int when
    both ends are ints, else float; `tag(log, interval(...))` the same on a log scale. A plain value
    is returned as its string: a fixed override for every trial."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ConfigError("hydra.sweeper.params", override.input_line, "a sweep Optuna cannot sample",
                      "use choice(...), a,b,c, range(...), interval(...) or tag(log, interval(...))")


def search_space(params: Dict[str, Any], arguments: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(distributions, fixed overrides) from `hydra.sweeper.params` and the command line's overrides
    (the command line wins for the same key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines: Dict[str, str] = {}
    for line in [f"{k}={v}" for k, v in params.items()] + list(arguments):
        lines[line.split("=", 1)[0]] = line
    space: Dict[str, Any] = {}
    fixed: Dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(lines.values())):
        found = distribution(override)
        (fixed if isinstance(found, str) else space)[override.get_key_element()] = found
    return space, fixed


@dataclass
class PrunerConfig:
    """`hydra.sweeper.pruner`: which pruner, its settings, and `patience` (> 0: PatientPruner around it)."""

    name: str = "none"
    patience: int = 0
    min_delta: float = 0.0
    n_startup_trials: int = 1
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1
    min_resource: Any = "auto"
    max_resource: Any = "auto"
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0


def pruner_config(options: Optional[Dict[str, Any]]) -> PrunerConfig:
    options = dict(options or {})
    unknown = sorted(set(options) - set(PrunerConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"hydra.sweeper.pruner.{unknown[0]}", options[unknown[0]], "not a pruner setting",
                          f"use {', '.join(PrunerConfig.__dataclass_fields__)}")
    pc = PrunerConfig(**options)
    if pc.name not in PRUNERS:
        raise ConfigError("hydra.sweeper.pruner.name", pc.name, "not a pruner sd3exp knows",
                          f"use one of {', '.join(PRUNERS)}")
    if pc.patience < 0:
        raise ConfigError("hydra.sweeper.pruner.patience", pc.patience, "must be 0 (no PatientPruner) or more",
                          "e.g. hydra.sweeper.pruner.patience=1")
    return pc


def make_pruner(options: Optional[Dict[str, Any]]) -> Any:
    """The Optuna pruner of `hydra.sweeper.pruner` (NopPruner for `none`)."""
    import optuna

    pc = pruner_config(options)
    pruner: Any
    if pc.name == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=pc.n_startup_trials, n_warmup_steps=pc.n_warmup_steps,
                                             interval_steps=pc.interval_steps, n_min_trials=pc.n_min_trials)
    elif pc.name == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=pc.min_resource,
                                                        reduction_factor=pc.reduction_factor,
                                                        min_early_stopping_rate=pc.min_early_stopping_rate)
    elif pc.name == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1 if pc.min_resource == "auto" else pc.min_resource,
                                                max_resource=pc.max_resource, reduction_factor=pc.reduction_factor)
    else:
        return optuna.pruners.NopPruner()
    if not pc.patience:
        return pruner
    import warnings

    with warnings.catch_warnings():  # "PatientPruner is experimental": in Optuna since 2.8, unchanged
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(pruner, patience=pc.patience, min_delta=pc.min_delta)


def make_sampler(options: Optional[Dict[str, Any]]) -> Any:
    """`hydra.sweeper.sampler`: {name: tpe | random | grid, seed, ...TPE options}. `grid` is TPE after
    each combination of the choice(...) parameters has been tried once (grid_points): Optuna's
    GridSampler calls Study.stop, which ask/tell outside study.optimize does not allow."""
    import optuna

    options = dict(options or {})
    name = options.pop("name", "tpe")
    seed = options.pop("seed", None)
    if name in ("tpe", "grid"):
        return optuna.samplers.TPESampler(seed=seed, **options)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError("hydra.sweeper.sampler.name", name, "not a sampler sd3exp knows", f"use one of {', '.join(SAMPLERS)}")


def grid_points(options: Optional[Dict[str, Any]], space: Dict[str, Any]) -> List[Dict[str, Any]]:
    """With `sampler.name=grid`: every combination of the choice(...) parameters, in the order written
    (the first parameter varies slowest); none otherwise."""
    import itertools

    if (options or {}).get("name") != "grid":
        return []
    if not all(hasattr(d, "choices") for d in space.values()):
        raise ConfigError("hydra.sweeper.sampler.name", "grid", "the grid takes choice(...) parameters only",
                          "use choice(...) or comma lists, or hydra.sweeper.sampler.name=tpe")
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k].choices for k in keys))]


def masked(url: str) -> str:
    """The storage URL to show or write: its password replaced by `***` (an `env:NAME` as it is)."""
    if url.startswith(ENV_PREFIX):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: nothing of it is shown (Optuna will refuse it, unnamed)
        return "<the storage URL, not shown: SQLAlchemy cannot parse it>"


def has_password(url: str) -> bool:
    if url.startswith(ENV_PREFIX):
        return False
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:
        return True  # unparsed: treated as secret


def resolve_storage(storage: str, field: str) -> str:
    """The URL of `storage`: itself, or with `env:NAME` NAME's value (refused, naming `field`, when unset)."""
    import os

    if not storage.startswith(ENV_PREFIX):
        return storage
    name = storage[len(ENV_PREFIX):]
    value = os.environ.get(name)
    if not value:
        raise ConfigError(field, storage, f"the environment variable {name} is not set in this process",
                          f"export {name}=<storage URL> where the sweep (and its jobs) start")
    return value


def quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def encode(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    if isinstance(value, str):
        return value  # categorical choices are already encoded (Transformer.encode)
    return repr(value) if isinstance(value, float) else str(value)


def _plain(options: Any) -> Dict[str, Any]:
    """A sweeper option as a plain dict (resolved; {} when unset)."""
    from sd3exp.experiment import to_dict

    return to_dict(options, resolve=True) if isinstance(options, DictConfig) else dict(options or {})


class OptunaSweeper:
    """Hydra sweeper: Optuna ask/tell over Hydra's launcher, studies in an Optuna storage, pruning."""

    def __init__(self, direction: str = "maximize", study_name: Optional[str] = None, storage: Optional[str] = None,
                 n_trials: int = 8, n_jobs: int = 1, sampler: Any = None, pruner: Any = None,
                 params: Any = None) -> None:
        self.direction, self.study_name, self.storage = direction, study_name or "sd3exp", storage
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler_options, self.pruner_options, self.params = _plain(sampler), _plain(pruner), _plain(params)
        self.job_storage: Optional[str] = None  # what jobs get as `sweep.optuna.storage` when not the URL (hide_password)
        pruner_config(self.pruner_options)  # refuse a bad pruner before anything runs
        if direction not in ("maximize", "minimize"):
            raise ConfigError("hydra.sweeper.direction", direction, "must be maximize or minimize",
                              "hydra.sweeper.direction=maximize (pixel_fidelity, clip_*, dino_i) or minimize (drift)")

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.check_objective()
        self.hide_password()

    def hide_password(self) -> None:
        """A storage URL with a password: Hydra's config (saved in each job's .hydra/hydra.yaml and
        pickled by submitit with the jobs) gets it masked, and the full URL goes to the jobs through
        the environment variable SD3EXP_OPTUNA_STORAGE. `hydra.sweeper.storage=env:NAME`: jobs read NAME."""
        import os

        if not self.storage or not has_password(self.storage):
            return
        shown = masked(self.storage)
        os.environ[STORAGE_ENV] = self.storage
        self.job_storage = ENV_PREFIX + STORAGE_ENV
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import read_write

        configs = [self.config]
        if HydraConfig.initialized():
            configs.append(HydraConfig.instance().cfg)  # type: ignore[arg-type]  # pickled with the jobs (Singleton state)
        for cfg in configs:
            with read_write(cfg.hydra):
                if OmegaConf.select(cfg, "hydra.sweeper.storage") is not None:
                    cfg.hydra.sweeper.storage = shown
                lines = OmegaConf.select(cfg, "hydra.overrides.hydra") or []
                cfg.hydra.overrides.hydra = [f"{line.split('=', 1)[0]}={quoted(shown)}"
                                             if line.split("=", 1)[0].lstrip("+~") == "hydra.sweeper.storage" else line
                                             for line in lines]

    def check_objective(self) -> None:
        """Pruning needs scored checkpoints, and the study's direction must be the objective's."""
        backend = OmegaConf.select(self.config, "eval.backend", default="diffusers")
        if pruner_config(self.pruner_options).name != "none" and backend == "none":
            raise ConfigError("hydra.sweeper.pruner.name", self.pruner_options.get("name"),
                              "pruning needs each checkpoint's score, but eval.backend=none",
                              "use eval.backend=diffusers (or comfyui), or hydra.sweeper.pruner.name=none")
        from sd3exp.evaluate.select import MEASURES

        objective = OmegaConf.select(self.config, "eval.select.objective", default="pixel_fidelity")
        own = OmegaConf.select(self.config, "eval.select.direction", default=None)
        if objective in MEASURES:
            wanted = {"max": "maximize", "min": "minimize"}[own or MEASURES[objective][0]]
            if wanted != self.direction:
                raise ConfigError("hydra.sweeper.direction", self.direction,
                                  f"eval.select.objective={objective} is better when {'higher' if wanted == 'maximize' else 'lower'}",
                                  f"hydra.sweeper.direction={wanted}")

    def storage_url(self) -> str:
        """The full URL (`env:NAME` resolved): for Optuna only, never shown (masked() is)."""
        if not self.storage:
            return f"sqlite:///{self.sweep_dir / 'optuna.db'}"
        return resolve_storage(self.storage, "hydra.sweeper.storage")

    def sweep(self, arguments: List[str]) -> List[Any]:
        import optuna
        from optuna.trial import TrialState

        space, fixed = search_space(self.params, arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        url = self.storage_url()
        study = optuna.create_study(storage=url, study_name=self.study_name, load_if_exists=True,
                                    direction=cast(Literal["minimize", "maximize"], self.direction), sampler=make_sampler(self.sampler_options),
                                    pruner=make_pruner(self.pruner_options))
        study.set_user_attr(PRUNER_ATTR, self.pruner_options)
        study.set_user_attr("sd3exp_sampler", self.sampler_options)
        shown = masked(self.storage if self.storage and self.storage.startswith(ENV_PREFIX) else url)
        console.info(f"optuna: study {self.study_name!r} in {shown} (`optuna-dashboard {masked(url)}` shows it"
                     + (", with the password" if has_password(url) else "") + ")")
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        resume = [t for t in trials if t.state == TrialState.RUNNING]
        if finished or resume:
            console.info(f"optuna: continuing the study: {len(finished)} trial(s) finished, "
                         f"{len(resume)} left running by an earlier sweep process (resumed with the same number)")
        returns: List[Any] = []
        grid = grid_points(self.sampler_options, space)
        done = len(finished)
        self.write_trials(study)
        while done < self.n_trials:
            batch: List[Tuple[int, Dict[str, Any], Optional["optuna.trial.Trial"]]]
            if resume:
                batch = [(t.number, dict(t.params), None) for t in resume[:self.n_jobs]]
                resume = resume[self.n_jobs:]
            else:
                want = min(self.n_jobs, self.n_trials - done)
                asked = []
                for _ in range(want):
                    grid = self.enqueue_next(study, grid)
                    asked.append(study.ask(fixed_distributions=space))
                batch = [(t.number, dict(t.params), t) for t in asked]
            self.write_trials(study)  # the batch shows as running while it runs
            returns += self.run_batch(study, batch, fixed, url)
            done += len(batch)
            self.write_trials(study)
        self.write_results(study)
        return returns

    @staticmethod
    def enqueue_next(study: Any, grid: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Enqueue the first grid point the study has not tried yet (one per trial asked, so a study
        holds no waiting trials beyond n_trials); the grid points left after it."""
        while grid:
            point, grid = grid[0], grid[1:]
            before = len(study.get_trials(deepcopy=False))
            study.enqueue_trial(point, skip_if_exists=True)
            if len(study.get_trials(deepcopy=False)) > before:
                break
        return grid

    def overrides(self, number: int, params: Dict[str, Any], fixed: Dict[str, str], url: str) -> List[str]:
        return ([f"{k}={encode(v)}" for k, v in params.items()] + [f"{k}={v}" for k, v in fixed.items()]
                + [f"sweep.optuna.storage={quoted(self.job_storage or self.storage or url)}",
                   f"sweep.optuna.study={quoted(self.study_name)}",
                   f"sweep.optuna.trial={number}"])

    def run_batch(self, study: Any, batch: List[Tuple[int, Dict[str, Any], Any]], fixed: Dict[str, str],
                  url: str) -> List[Any]:
        """Launch the batch's trials (consecutive numbers together: job number = trial number) and tell
        the study how each ended."""
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        returns: List[Any] = []
        groups: List[List[Tuple[int, Dict[str, Any], Any]]] = []
        for item in sorted(batch, key=lambda b: b[0]):
            if groups and groups[-1][-1][0] + 1 == item[0]:
                groups[-1].append(item)
            else:
                groups.append([item])
        for group in groups:
            launched = self.launcher.launch([self.overrides(n, p, fixed, url) for n, p, _ in group],
                                            initial_job_idx=group[0][0])
            for (number, _, _), ret in zip(group, launched):
                frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
                pruned = frozen.user_attrs.get(PRUNED_ATTR)
                value = None
                if ret.status == JobStatus.COMPLETED:
                    value = ret.return_value
                if pruned:
                    study.tell(number, state=TrialState.PRUNED)
                elif ret.status != JobStatus.COMPLETED or not isinstance(value, (int, float)) or not math.isfinite(value):
                    study.tell(number, state=TrialState.FAIL)
                else:
                    study.tell(number, float(value))
                returns.append(ret)
        return returns

    def write_trials(self, study: Any) -> None:
        """<sweep dir>/.sweep/optuna/trials.json: each trial's state and value, for sweep.json (sd3exp/sweep.py
        reads it without importing optuna)."""
        from sd3exp.io import write_json
        from sd3exp.sweep import RECORDS, TRIALS

        states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
                  "WAITING": "waiting"}
        write_json(self.sweep_dir / TRIALS, {
            "study": self.study_name, "storage": masked(self.storage or self.storage_url()), "direction": self.direction,
            "pruner": self.pruner_options, "sampler": self.sampler_options, "n_trials": self.n_trials,
            "trials": {str(t.number): {"state": states[t.state.name], "value": t.value, "params": t.params,
                                       "pruned": t.user_attrs.get(PRUNED_ATTR)}
                       for t in study.get_trials(deepcopy=False)}})
        if (self.sweep_dir / RECORDS).is_dir():
            from sd3exp.sweep import write_summary

            write_summary(self.sweep_dir)

    def write_results(self, study: Any) -> None:
        """optimization_results.yaml (best parameters and value), as Hydra's Optuna sweeper wrote it."""
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            console.warn(f"optuna: no trial of study {self.study_name!r} completed; no best parameters")
            return
        best = study.best_trial
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value,
                   "best_trial": best.number}
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        console.info(f"optuna: best trial {best.number}: {best.value:.6g} with "
                     + ", ".join(f"{k}={v}" for k, v in best.params.items()))
