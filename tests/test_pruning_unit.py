"""sd3exp's Optuna sweeper without a trainer: the params grammar -> Optuna distributions, the pruner
and sampler settings, a job reporting to its trial and being pruned, the sweep summary's trial rows."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sd3exp.errors import ConfigError
from sd3exp.optuna_sweep import (
    PRUNED_ATTR,
    PRUNER_ATTR,
    OptunaSweeper,
    grid_points,
    make_pruner,
    pruner_config,
    search_space,
)
from sd3exp.optuna_sweep.job import TrialReporter
from sd3exp.schema import OptunaTrialConfig
from sd3exp.sweep import steps_saved, trial_number

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_params_grammar_maps_to_optuna_distributions():
    space, fixed = search_space({"optimizer.lr": "tag(log, interval(1.0e-5, 5.0e-4))", "lora.rank": "choice(4, 8, 16)",
                                 "lora.alpha": "interval(1, 9)", "seed": "range(1, 7, 2)", "training.epochs": "3",
                                 "optimizer.max_grad_norm": "range(0.5, 1.5, 0.5)", "schedule.name": "cosine,linear"}, [])
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 5e-4, log=True)
    assert space["lora.rank"] == CategoricalDistribution([4, 8, 16])
    assert space["lora.alpha"] == FloatDistribution(1.0, 9.0)  # Hydra parses interval bounds as floats
    assert space["seed"] == IntDistribution(1, 7, step=2)
    assert space["optimizer.max_grad_norm"] == FloatDistribution(0.5, 1.5, step=0.5)
    assert space["schedule.name"] == CategoricalDistribution(["cosine", "linear"])
    assert fixed == {"training.epochs": "3"}


def test_the_command_line_wins_over_the_config():
    space, fixed = search_space({"lora.rank": "choice(4, 8)"}, ["lora.rank=16,32", "stage=all"])
    assert space == {"lora.rank": CategoricalDistribution([16, 32])} and fixed == {"stage": "all"}


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-7, 1.0), st.floats(1.01, 100.0), st.booleans())
def test_an_interval_is_a_float_range_of_the_same_bounds(low, factor, log):
    high = low * factor
    text = f"interval({low!r}, {high!r})"
    space, _ = search_space({"optimizer.lr": f"tag(log, {text})" if log else text}, [])
    dist = space["optimizer.lr"]
    assert isinstance(dist, FloatDistribution) and dist.log == log
    assert math.isclose(dist.low, low) and math.isclose(dist.high, high)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=6, unique=True))
def test_choices_keep_their_values_and_order(values):
    space, _ = search_space({"lora.rank": f"choice({', '.join(map(str, values))})"}, [])
    assert list(space["lora.rank"].choices) == values
    assert grid_points({"name": "grid"}, space) == [{"lora.rank": v} for v in values]


def test_pruners_from_config():
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)
    median = make_pruner({"name": "median", "n_startup_trials": 2, "n_warmup_steps": 100})
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_startup_trials == 2 and median._n_warmup_steps == 100
    assert isinstance(make_pruner({"name": "successive_halving"}), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner({"name": "hyperband", "max_resource": 300}), optuna.pruners.HyperbandPruner)
    patient = make_pruner({"name": "median", "patience": 2})
    assert isinstance(patient, optuna.pruners.PatientPruner) and isinstance(patient._wrapped_pruner,
                                                                            optuna.pruners.MedianPruner)


@pytest.mark.parametrize("options, field", [({"name": "asha"}, "hydra.sweeper.pruner.name"),
                                            ({"name": "median", "patience": -1}, "hydra.sweeper.pruner.patience"),
                                            ({"name": "median", "warmup": 3}, "hydra.sweeper.pruner.warmup")])
def test_a_bad_pruner_is_refused_naming_the_field(options, field):
    with pytest.raises(ConfigError) as err:
        pruner_config(options)
    assert err.value.field == field and "Fix:" in str(err.value)
    with pytest.raises(ConfigError):
        OptunaSweeper(pruner=options)


def test_a_grid_takes_choices_only():
    space, _ = search_space({"optimizer.lr": "interval(1e-5, 1e-3)"}, [])
    with pytest.raises(ConfigError, match="choice"):
        grid_points({"name": "grid"}, space)


def test_a_job_reports_to_its_trial_and_is_pruned_below_the_median(tmp_path):
    """The job's side: reconnect to the trial the sweeper asked for, report per step, be pruned."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize",
                                pruner=make_pruner({"name": "median", "n_startup_trials": 1}))
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "n_startup_trials": 1})
    first = study.ask()
    for step, value in ((50, 10.0), (100, 20.0)):
        first.report(value, step)
    study.tell(first, 20.0)
    second = study.ask()
    job = TrialReporter(OptunaTrialConfig(storage=url, study="s", trial=second.number))
    assert not job.should_prune()  # nothing reported yet
    job.report(50, 12.0)
    job.report(50, 1.0)  # a step reported once (a resumed job evaluates it again): ignored
    job.report(60, float("nan"))  # not scored: not reported
    assert not job.should_prune()
    job.report(100, 5.0)
    assert job.should_prune() and job.pruner == "MedianPruner"
    job.mark_pruned({"step": 100})
    frozen = optuna.load_study(study_name="s", storage=url).trials[second.number]
    assert frozen.intermediate_values == {50: 12.0, 100: 5.0} and frozen.user_attrs[PRUNED_ATTR] == {"step": 100}
    with pytest.raises(ConfigError, match="sweep.optuna.trial"):
        TrialReporter(OptunaTrialConfig(storage=url, study="s", trial=99))


def test_trial_numbers_and_steps_saved():
    assert trial_number({"overrides": ["optimizer.lr=0.1", "sweep.optuna.trial=3"]}) == 3
    assert trial_number({"overrides": ["optimizer.lr=0.1"]}) is None
    jobs = [{"trial": {"state": "complete", "steps_trained": 300, "steps_planned": 300}},
            {"trial": {"state": "pruned", "steps_trained": 100, "steps_planned": 300}},
            {"trial": {"state": "pruned", "steps_trained": 50, "steps_planned": 300}},
            {"trial": {"state": "running", "steps_trained": 50, "steps_planned": 300}}, {"trial": None}]
    assert steps_saved(jobs) == {"steps": 450, "planned": 900, "trained": 450, "share": 0.5}
    assert steps_saved([{"trial": None}]) is None


def test_pruning_without_scores_is_refused(tmp_path):
    from sd3exp.live import check
    from tests.helpers import compose_experiment

    cfg = compose_experiment("demo_quick", ["eval.backend=none", "sweep.optuna.trial=0"])
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert err.value.field == "eval.backend"


def test_the_trial_overrides_change_neither_the_compiled_files_nor_the_identity():
    """sweep.optuna.* say how a job runs: `sd3exp diff` (compiled files, plan, resolved settings, the
    config hash) finds nothing, and the run folder's name leaves them out."""
    from sd3exp.runfolder import training_overrides
    from tests.helpers import run_main

    out = run_main("diff", "demo_quick", "demo_quick sweep.optuna.trial=3 sweep.optuna.study=s "
                   "sweep.optuna.storage=sqlite:////tmp/x.db")
    assert out.returncode == 0, out.stdout + out.stderr
    assert training_overrides(["optimizer.lr=0.1", "sweep.optuna.trial=3", "sweep.optuna.study=s"]) == "optimizer.lr=0.1"


def test_the_sweeper_asks_the_grid_in_order_and_a_rerun_continues_the_study(tmp_path):
    """Without a trainer: `stage=plan` jobs return no objective, so every trial fails; the grid is
    asked in the order written, each job gets its trial's overrides, and the same command run again
    finds the study finished (no new trial)."""
    from tests.helpers import run_cli

    cmd = ["-m", "experiment=demo", "hparams_search=demo_pruned", "stage=plan", f"hydra.sweep.dir={tmp_path}"]
    out = run_cli(*cmd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = optuna.load_study(study_name="demo_pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.params["optimizer.lr"] for t in study.trials] == [1e-5, 3e-4, 2e-3]
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.FAIL}
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["swept"] == ["optimizer.lr"]  # the sweep.optuna.* overrides are not swept values
    assert [j["trial"]["state"] for j in sorted(data["jobs"], key=lambda j: j["num"])] == ["failed"] * 3
    assert data["optuna"]["pruner"]["name"] == "median"
    again = run_cli(*cmd, timeout=600)
    assert again.returncode == 0 and "continuing the study: 3 trial(s) finished" in again.stdout + again.stderr
    assert len(optuna.load_study(study_name="demo_pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 3


def test_a_pruner_without_scores_is_refused_before_any_trial(tmp_path):
    from tests.helpers import run_cli

    out = run_cli("-m", "experiment=demo", "hparams_search=demo_pruned", "eval.backend=none", "stage=plan",
                  f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert out.returncode == 2 and "sd3exp: error: hydra.sweeper.pruner.name=" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "optuna.db").exists()


def test_a_storage_password_is_masked_and_an_env_storage_is_read_from_the_environment(tmp_path, monkeypatch):
    from sd3exp.optuna_sweep import has_password, masked, resolve_storage

    url = "mysql+pymysql://optuna:s3cr3t-pw@db.example:3306/optuna"
    assert masked(url) == "mysql+pymysql://optuna:***@db.example:3306/optuna" and has_password(url)
    assert masked("sqlite:////x/optuna.db") == "sqlite:////x/optuna.db" and not has_password("sqlite:////x/optuna.db")
    assert masked("env:MY_STORAGE") == "env:MY_STORAGE" and "s3cr3t" not in masked("not a url s3cr3t")
    monkeypatch.delenv("MY_STORAGE", raising=False)
    with pytest.raises(ConfigError) as err:
        resolve_storage("env:MY_STORAGE", "sweep.optuna.storage")
    assert err.value.field == "sweep.optuna.storage" and "MY_STORAGE" in str(err.value)
    # a job given `env:NAME` (what the sweeper passes for a URL with a password) reaches its trial
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    monkeypatch.setenv("MY_STORAGE", storage)
    job = TrialReporter(OptunaTrialConfig(storage="env:MY_STORAGE", study="s", trial=trial.number))
    job.report(10, 1.5)
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == {10: 1.5}


def test_a_storage_password_is_in_no_file_of_the_sweep_folder_and_no_output(tmp_path):
    """A sweep through submitit (jobs pickled into .submitit/) with a storage URL holding a password
    (tests/sqlite_password.py): the console, trials.json, sweep.json, Hydra's configs and overrides,
    the run folders and submitit's pickles hold it masked or as `env:SD3EXP_OPTUNA_STORAGE`, never the
    password; the study is in the storage."""
    import subprocess
    import sys

    from sd3exp.project import ROOT
    from tests import sqlite_password

    secret = "Pw-9f3kQ2zLx7"
    url = f"sqlite+pwtest://optuna:{secret}@/{tmp_path / 'optuna.db'}"
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-c", "import tests.sqlite_password as m; m.main()", "-m",
                          "experiment=demo", "hparams_search=demo_pruned", "stage=compile", "hydra.sweeper.n_trials=1",
                          "hydra/launcher=submitit_local", f"hydra.sweeper.storage='{url}'", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert secret not in out.stdout + out.stderr and "optuna:***@" in out.stdout + out.stderr
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in files) and (sweep / "0_demo" / "resolved.yaml").is_file()
    assert [p for p in files if secret.encode() in p.read_bytes()] == []
    assert json.loads((sweep / "sweep.json").read_text())["optuna"]["storage"].startswith("sqlite+pwtest://optuna:***@")
    assert "sweep.optuna.storage='env:SD3EXP_OPTUNA_STORAGE'" in json.loads((sweep / ".sweep" / "0.json").read_text())["overrides"]
    sqlite_password.register()
    assert len(optuna.load_study(study_name="demo_pruned", storage=url).trials) == 1


def test_after_its_evaluation_a_job_reports_what_its_watcher_did_not(tmp_path, monkeypatch):
    """A trial's job requeued after its training had ended trains nothing (no watcher): stage=eval's
    report_trial reports the scored checkpoints the trial lacks; a pruned run nothing past its stop."""
    from sd3exp import live
    from sd3exp.live.state import LIVE_FILE, LiveState, Point
    from tests.helpers import compose_experiment

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"name": "median"})
    trial = study.ask()
    trial.report(1.0, 4)  # reported by the job before its preemption
    cfg = compose_experiment("demo_quick", [f"sweep.optuna.storage={url}", "sweep.optuna.study=s",
                                            f"sweep.optuna.trial={trial.number}"])
    monkeypatch.setattr(live, "objectives", lambda run_dir, objective: [Point(4, 9.0), Point(8, 2.0), Point(12, None)])
    run = tmp_path / "run"
    run.mkdir()
    live.report_trial(cfg, run)
    assert optuna.load_study(study_name="s", storage=url).trials[0].intermediate_values == {4: 1.0, 8: 2.0}
    LiveState(pruned={"step": 8}).save(run / LIVE_FILE)
    monkeypatch.setattr(live, "objectives", lambda run_dir, objective: [Point(16, 3.0)])
    live.report_trial(cfg, run)
    assert 16 not in optuna.load_study(study_name="s", storage=url).trials[0].intermediate_values


def test_sd3exp_errors_survive_pickling():
    """submitit pickles a failed Slurm job's exception into its result: unpickling it in the sweep's
    process must give the error back, not a TypeError that ends the sweep."""
    import pickle

    from sd3exp.errors import ConfigErrors, Interrupted
    from sd3exp.evaluate.stage import EvalInterrupted

    one = ConfigError("concepts[0].repeats", 1, "fewer than one batch", "concepts.0.repeats=8")
    for err in (one, ConfigErrors([one, ConfigError("lora.rank", 0, "must be > 0", "lora.rank=4")]),
                Interrupted("stopped", 15), EvalInterrupted("kept 3 cells", 130)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.exit_code == err.exit_code
    assert pickle.loads(pickle.dumps(one)).field == "concepts[0].repeats"
