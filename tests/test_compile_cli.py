"""`python -m sd3exp ... stage=compile` as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, needs_trainer, run_cli, trainer_python

EXPERIMENTS = ["fantasy_art", "fantasy_art_lora", "cinema_photo", "two_concepts", "demo", "demo_lora"]


def compile_to(run_dir: Path, *overrides: str):
    return run_cli(*overrides, "stage=compile", f"hydra.run.dir={run_dir}")


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fantasy_art_compiles_with_the_planned_figures(tmp_path):
    out = compile_to(tmp_path / "run", "experiment=fantasy_art")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    env = (run / "config" / "config.env").read_text()
    assert "MAX_NUM_STEPS=24000\n" in env and "NUM_EPOCHS=0\n" in env and "CHECKPOINTING_STEPS=800\n" in env
    assert "CONFIG_BACKEND=json\n" in env and "CHECKPOINTING_LIMIT=30\n" in env
    backends = json.loads((run / "config" / "multibackend.json").read_text())
    assert backends[0]["repeats"] == 9 and backends[0]["id"] == "fantasy"
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["steps_per_epoch"], plan["max_train_steps"], plan["naive_steps_per_epoch"]) == (794, 24000, 793.33)
    assert plan["checkpoint_steps"][:2] == [800, 1600] and len(plan["checkpoint_steps"]) == 30
    assert "794" in out.stdout and "793.33" in out.stdout


def test_compiling_twice_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert compile_to(a, "experiment=fantasy_art_lora", "lora.rank=32").returncode == 0
    first = tree(a)
    assert compile_to(a, "experiment=fantasy_art_lora", "lora.rank=32").returncode == 0
    assert tree(a) == first
    assert compile_to(b, "experiment=fantasy_art_lora", "lora.rank=32").returncode == 0
    assert tree(b)["config/config.env"] == first["config/config.env"]
    assert "--lora_rank=32" in first["config/config.env"].decode()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_compiles(tmp_path, experiment):
    out = compile_to(tmp_path / "run", f"experiment={experiment}")
    assert out.returncode == 0, out.stderr
    env = (tmp_path / "run" / "config" / "config.env").read_text()
    steps = [ln for ln in env.splitlines() if ln.startswith(("MAX_NUM_STEPS=", "NUM_EPOCHS="))]
    assert sum(not ln.endswith("=0") for ln in steps) == 1, steps


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lrr=1e-4", "lrr"),
    ("optimizer.lr=-1e-4", "optimizer.lr=-0.0001"),
    ("validation.enabled=true", "validation.prompt"),
    ("concepts.0.captions.separator='|'", "concepts[0].captions.separator='|'"),
])
def test_bad_input_fails_with_one_paragraph_and_writes_nothing(tmp_path, override, needle):
    run = tmp_path / "run"
    # config.env (trainer.config_backend=env) is where a shell substitution would mean something
    extra = (["validation.prompt='$(touch pwned)'", "validation.every_steps=100", "trainer.config_backend=env"]
             if "validation" in override else [])
    out = compile_to(run, "experiment=fantasy_art", override, *extra)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert not run.exists()
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_changed_config_is_refused_then_new_run(tmp_path):
    run = tmp_path / "run"
    assert compile_to(run, "experiment=demo").returncode == 0
    out = compile_to(run, "experiment=demo", "optimizer.lr=2e-4")
    assert out.returncode != 0 and "trainer.new_run=true" in out.stderr
    out = compile_to(run, "experiment=demo", "optimizer.lr=2e-4", "trainer.new_run=true")
    assert out.returncode == 0, out.stderr
    assert "LEARNING_RATE=0.0002" in (tmp_path / "run-2" / "config" / "config.env").read_text()
    assert "LEARNING_RATE=0.002\n" in (run / "config" / "config.env").read_text()


def test_json_backend_carries_what_env_cannot(tmp_path):
    run = tmp_path / "run"
    prompt = 'a "quoted" $HOME prompt'
    out = compile_to(run, "experiment=demo", "validation.enabled=true", "validation.every_steps=2",
                     f"validation.prompt='{prompt}'", "trainer.config_backend=json")
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "config" / "config.json").read_text())["validation_prompt"] == prompt
    env = (run / "config" / "config.env").read_text()
    assert "CONFIG_BACKEND=json" in env and "MIXED_PRECISION=no\n" in env and "TRAINING_NUM_PROCESSES=1\n" in env
    assert "VALIDATION_PROMPT" not in env  # config.env cannot carry it: only the launcher's variables


@pytest.mark.parametrize("experiment", sorted(p.name for p in (ROOT / "compiled").iterdir()))
def test_every_locked_experiment_clips_by_norm_and_reads_config_json(experiment):
    """issue 18 items 4 and 6: --grad_clip_method=norm (4.10.1 defaults to value) and config.json as what
    `simpletuner train` reads, config.env compiled beside it with the same arguments."""
    folder = ROOT / "compiled" / experiment / "config"
    config = json.loads((folder / "config.json").read_text())
    env = (folder / "config.env").read_text()
    assert config["grad_clip_method"] == "norm" and config["max_grad_norm"] == 1.0
    assert "\nCONFIG_BACKEND=json\n" in env and "--grad_clip_method=norm" in env


def test_clip_by_value_and_the_env_backend_compile(tmp_path):
    run = tmp_path / "run"
    out = compile_to(run, "experiment=demo", "optimizer.clip=value", "trainer.config_backend=env")
    assert out.returncode == 0, out.stderr
    env = (run / "config" / "config.env").read_text()
    assert "\nCONFIG_BACKEND=env\n" in env and "--grad_clip_method=value" in env
    assert json.loads((run / "config" / "config.json").read_text())["grad_clip_method"] == "value"


def test_unknown_clip_method_is_refused(tmp_path):
    out = compile_to(tmp_path / "run", "experiment=demo", "optimizer.clip=global")
    assert out.returncode != 0 and "optimizer.clip='global'" in out.stderr and "norm, value" in out.stderr
    assert not (tmp_path / "run").exists()


def parse_all(runs: list) -> list:
    """SimpleTuner's parse of each run folder, all in one trainer process."""
    from sd3exp import preflight
    from sd3exp.trainer_env import TrainerEnv

    python = trainer_python()
    return preflight.run_parsers(TrainerEnv("managed", python.parent.parent, python, "4.10.1"), runs)


@pytest.fixture(scope="module")
def parsed_experiments(tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = {e: tmp_path_factory.mktemp(e) / "run" for e in EXPERIMENTS}
    for experiment, run in runs.items():
        assert compile_to(run, f"experiment={experiment}").returncode == 0
    return dict(zip(EXPERIMENTS, zip(runs.values(), parse_all(list(runs.values())))))


@needs_trainer
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_simpletuner_accepts_the_arguments(parsed_experiments, experiment):
    run, result = parsed_experiments[experiment]
    assert result["ok"], result.get("error")
    assert result["args"]["grad_clip_method"] == "norm" and result["args"]["max_grad_norm"] == 1.0
    plan = json.loads((run / "plan.json").read_text())
    keep = 0 if experiment.startswith("demo") else (30 if experiment.startswith("fantasy") else None)
    if keep is not None:
        assert result["args"]["checkpoints_total_limit"] == keep  # 0: SimpleTuner keeps every checkpoint
    if plan["stop_rule"] == "max_steps":
        assert result["args"]["max_train_steps"] == plan["max_train_steps"]


@needs_trainer
def test_simpletuner_reads_either_backend_each_run_its_own(tmp_path):
    """The default json backend and trainer.config_backend=env (config.env alone) both parse; parsed in one
    process, each run reads its own arguments."""
    runs = []
    for backend, clip, rank in [("env", "value", 8), ("json", "norm", 4)]:
        run = tmp_path / backend
        assert compile_to(run, "experiment=demo_quick", f"trainer.config_backend={backend}",
                          f"optimizer.clip={clip}", f"lora.rank={rank}").returncode == 0
        if backend == "env":
            (run / "config" / "config.json").unlink()  # then only config.env can give the arguments
        runs.append(run)
    env_run, json_run = parse_all(runs)
    assert env_run["ok"] and json_run["ok"], (env_run.get("error"), json_run.get("error"))
    assert (env_run["args"]["grad_clip_method"], env_run["args"]["lora_rank"]) == ("value", 8)
    assert (json_run["args"]["grad_clip_method"], json_run["args"]["lora_rank"]) == ("norm", 4)


def test_cfg_job_resolve_prints_the_resolved_experiment(tmp_path):
    out = run_cli("experiment=fantasy_art", "--cfg", "job", "--resolve")
    assert out.returncode == 0, out.stderr
    assert "trigger: k4s4" in out.stdout and "run_dir: " in out.stdout and "${" not in out.stdout


def test_run_folder_is_named_by_training_overrides_only(tmp_path):
    """eval.*, stage and paths.* pick what to run or where: the same run folder, same compiled files."""
    first = run_cli("experiment=demo", "stage=compile", f"paths.output_root={tmp_path}", "lora.rank=8",
                    "optimizer.lr=2e-4")
    assert first.returncode == 0, first.stderr
    run = tmp_path / "demo" / "lora.rank=8,optimizer.lr=2e-4"
    compiled = {p.name: p.read_bytes() for p in (run / "config").iterdir()}
    again = run_cli("experiment=demo", "stage=compile", f"paths.output_root={tmp_path}", "optimizer.lr=2e-4",
                    "lora.rank=8", 'eval.prompts=["k4s4, a, b"]', "+eval.workflow_inputs.7.vae_name=v.safetensors",
                    "eval.include_base=true", "trainer.cpu_shim=never")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [run.name]
    assert {p.name: p.read_bytes() for p in (run / "config").iterdir()} == compiled
    assert "# overrides: lora.rank=8,optimizer.lr=2e-4\n" in compiled["config.env"].decode()


def test_training_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    shared = tmp_path / "shared-training"
    (shared / "checkpoint-500").mkdir(parents=True)
    out = compile_to(tmp_path / "run", "experiment=demo", f"paths.training_dir={shared}")
    assert out.returncode != 0
    assert "paths.training_dir" in out.stderr and "already holds checkpoints" in out.stderr
    assert (shared / "checkpoint-500").is_dir()


def test_simpletuner_errors_are_mapped_to_experiment_fields():
    from sd3exp.compile import Arg
    from sd3exp.preflight import field_for

    args = [Arg("learning_rate", 1e-4, "optimizer.lr", "LEARNING_RATE"), Arg("optimizer", "nope", "optimizer.name"),
            Arg("lora_rank", 4, "lora.rank")]
    assert field_for("ValueError: Optimizer nope not found.", args) == "optimizer.name"
    assert field_for("error: argument --lora_rank: invalid int value: 'x'", args) == "lora.rank"
    assert field_for("something unrelated", args) == ""


def test_a_run_folder_in_use_is_refused(tmp_path):
    from sd3exp.runfolder import exclusive

    run = tmp_path / "run"
    assert compile_to(run, "experiment=demo").returncode == 0
    with exclusive(run, "train"):
        out = run_cli("experiment=demo", "stage=audit", f"hydra.run.dir={run}")
    assert out.returncode != 0 and "another sd3exp process is preparing or training" in out.stderr
    assert run_cli("experiment=demo", "stage=audit", f"hydra.run.dir={run}").returncode == 0
