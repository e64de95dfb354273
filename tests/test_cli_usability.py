"""The command line for a user who has not read the docs: help, versions, typos and missing folders."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.helpers import run_cli, run_main


def test_bare_sd3exp_shows_the_help_and_the_experiments():
    out = run_cli()
    assert out.returncode == 0, out.stderr
    assert "experiment: " in out.stdout and "demo_quick" in out.stdout and "Subcommands:" in out.stdout
    assert "training.epochs" not in out.stderr


def test_version_names_sd3exp_simpletuner_and_hydra():
    from hydra import __version__ as hydra_version

    from sd3exp import __version__

    out = run_main("--version")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == f"sd3exp {__version__}" and lines[1].startswith("SimpleTuner 4.10.1 (")
    assert lines[2] == f"Hydra {hydra_version}"


def test_a_mistyped_subcommand_is_named_with_the_one_meant(tmp_path):
    out = run_main("bset", str(tmp_path))
    assert out.returncode == 2 and "'bset' is not a subcommand" in out.stderr
    assert out.stderr.rstrip().endswith(f"Fix: sd3exp best {tmp_path}")
    out = run_main("demo_quick")
    assert out.returncode == 2 and out.stderr.rstrip().endswith("Fix: sd3exp experiment=demo_quick")


def test_diff_and_best_name_a_missing_folder(tmp_path):
    missing = tmp_path / "nonexistent"
    out = run_main("diff", str(missing), "demo_quick")
    assert out.returncode == 2 and f"{missing}: no such run folder" in out.stderr
    out = run_main("best", str(missing))
    assert out.returncode == 2 and f"{missing}: no such folder" in out.stderr


def test_a_run_folder_under_home_written_with_a_quoted_tilde_is_expanded(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    out = run_cli("experiment=demo_quick", "hydra.run.dir=~/runs/x", "stage=compile", cwd=cwd,
                  env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (home / "runs" / "x" / "run.json").is_file()
    assert list(cwd.iterdir()) == [] and not Path(cwd / "~").exists()


def test_sd3exp_debug_shows_the_traceback_behind_an_error():
    plain = run_main("best", "/nonexistent-sd3exp")
    assert "Traceback" not in plain.stderr
    out = run_cli("best", "/nonexistent-sd3exp", env={"SD3EXP_DEBUG": "1"})
    assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr
    assert "best_main" in out.stderr and out.stderr.rstrip().splitlines()[-1].startswith("sd3exp: error: ")


@pytest.mark.parametrize("override, shown, takes", [
    ("training.max_steps=abc", "'abc'", "an integer"),
    ("optimizer.lr=fast", "'fast'", "a number"),
    ("training.batch_size=2.5", "2.5", "an integer"),
    ("concepts.0.repeats=many", "'many'", "an integer"),
    ("eval.seeds=[1,x]", "[1, 'x']", "a list of integers"),
    ("schedule.warmup_steps=soon", "'soon'", "an integer"),
])
def test_an_override_of_the_wrong_type_names_the_field_and_a_command_that_works(tmp_path, override, shown, takes):
    key = override.split("=")[0]
    args = ["experiment=demo_quick", override, f"hydra.run.dir={tmp_path / 'run'}", "stage=plan"]
    out = run_cli(*args)
    last = out.stderr.rstrip().splitlines()[-1]
    assert out.returncode == 2 and "Error merging override" not in out.stderr, out.stderr
    assert last.startswith(f"sd3exp: error: {key}={shown}: {key} takes {takes}. Fix: ")
    fix = shlex.split(last.split("Fix: ", 1)[1])
    assert fix[0] == "sd3exp" and len(fix) == len(args) + 1
    assert run_cli(*fix[1:]).returncode == 0


@pytest.mark.parametrize("choice, bad, meant", [
    ("model=sd3_mediun", "sd3_mediun", "model=sd3_medium"),
    ("optimizer=adamww", "adamww", "optimizer=adamw"),
    ("model=tiny_sd3,sd35_mediun", "sd35_mediun", "model=tiny_sd3,sd35_medium"),  # a sweep's every value
    ("schedule=warmup_cosine", "warmup_cosine", "schedule=cosine"),
])
def test_a_config_file_a_group_lacks_is_named_with_the_groups_files_and_a_command_that_works(tmp_path, choice, bad,
                                                                                               meant):
    args = ["experiment=demo_quick", choice, f"hydra.sweep.dir={tmp_path / 'sweep'}", "stage=plan"]
    args = ["-m", *args] if "," in choice else args
    out = run_cli(*args)
    last = out.stderr.rstrip().splitlines()[-1]
    group = choice.split("=")[0]
    assert out.returncode == 2 and "Could not find" not in out.stderr, out.stderr
    assert not (tmp_path / "sweep").exists()  # refused before Hydra made any folder
    assert last.startswith(f"sd3exp: error: {group}={bad!r}: {group} has no config file {bad}.yaml (it has ")
    fix = shlex.split(last.split("Fix: ", 1)[1])
    assert fix == ["sd3exp", *[meant if a == choice else a for a in args]]
    assert run_cli(*fix[1:]).returncode == 0


@pytest.mark.parametrize("group", ["memory", "hparams_search"])  # a null default, and one that is not
def test_a_config_group_set_to_null_is_refused_with_the_tilde_that_drops_it(tmp_path, group):
    """Hydra fails with a traceback on group=null; `~group` is how Hydra drops a group's choice."""
    args = ["experiment=demo_quick", f"{group}=null", f"hydra.run.dir={tmp_path / 'run'}", "stage=plan"]
    out = run_cli(*args)
    last = out.stderr.rstrip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert last.startswith(f"sd3exp: error: {group}='null': Hydra does not take null for the config group {group}")
    fix = shlex.split(last.split("Fix: ", 1)[1])
    assert fix == ["sd3exp", *[f"~{group}" if a == f"{group}=null" else a for a in args]]
    assert not (tmp_path / "run").exists()
    assert run_cli(*fix[1:]).returncode == 0


def test_a_value_of_the_wrong_type_in_an_experiment_file_names_file_field_and_fix(tmp_path):
    mine = tmp_path / "conf" / "experiment" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    text = "# @package _global_\ndefaults:\n  - demo_quick\n  - _self_\noptimizer:\n  lr: 1e-4\ntraining:\n  batch_size: {}\n"
    mine.write_text(text.format("2.5"))
    args = ["--config-dir", str(tmp_path / "conf"), "experiment=mine", f"hydra.run.dir={tmp_path / 'run'}", "stage=plan"]
    out = run_cli(*args)
    last = out.stderr.rstrip().splitlines()[-1]
    assert out.returncode == 2 and "ValidationError" not in out.stderr, out.stderr
    assert last == (f"sd3exp: error: {mine}: training.batch_size=2.5: training.batch_size takes an integer. "
                    f"Fix: write batch_size: 2 under training in {mine}")
    mine.write_text(text.format("2"))
    assert run_cli(*args).returncode == 0


def test_independent_config_errors_are_shown_together_before_any_write(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("experiment=demo_quick", "lora.rank=0", "schedule.warmup_fraction=2", "concepts.0.repeats=0",
                  f"hydra.run.dir={run_dir}", "stage=plan")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "3 problems in the experiment" in out.stderr
    for field in ("lora.rank=0", "schedule.warmup_fraction=2", "concepts[0].repeats=0"):
        assert field in out.stderr
    assert not run_dir.exists()
    # one problem alone keeps its one-line message
    out = run_cli("experiment=demo_quick", "lora.rank=0", f"hydra.run.dir={run_dir}", "stage=plan")
    assert out.returncode == 2 and out.stderr.rstrip().splitlines()[-1].startswith("sd3exp: error: lora.rank=0: ")
