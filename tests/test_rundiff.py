"""`sd3exp diff A B` as a user runs it."""

from __future__ import annotations

import json

from tests.helpers import run_cli, run_main


def diff_json(a: str, b: str):
    out = run_main("diff", a, b, "--format", "json")
    return out.returncode, json.loads(out.stdout) if out.stdout else None, out


def keys(result: dict) -> set:
    return {(d["file"], d["key"], d["a"], d["b"], d["yaml"]) for d in result["differences"]}


def test_a_changed_lora_rank_gives_exactly_the_changed_keys():
    rc, result, _ = diff_json("fantasy_art_lora", "fantasy_art_lora lora.rank=32")
    assert rc == 1
    estimate = {k for k in keys(result) if k[0] == "plan.json" and k[1].startswith("estimate.")}
    assert keys(result) - estimate == {("config.env", "TRAINER_EXTRA_ARGS --lora_rank", "16", "32", "lora.rank"),
                                       ("config.json", "lora_rank", "16", "32", "lora.rank"),
                                       ("resolved.yaml", "lora.rank", "16", "32", "lora.rank")}
    # a rank of 32 trains twice the LoRA parameters: the plan's memory/disk estimate follows
    assert ("plan.json", "estimate.trained_parameters", "4718592", "9437184", None) in estimate
    assert result["config_hash"]["differs"]


def test_lora_rank_of_a_full_fine_tune_is_only_a_yaml_difference():
    rc, result, _ = diff_json("fantasy_art", "fantasy_art lora.rank=32")
    assert rc == 1 and keys(result) == {("resolved.yaml", "lora.rank", "16", "32", "lora.rank")}


def test_a_run_folder_equals_the_spec_it_was_compiled_from(tmp_path):
    run = tmp_path / "run"
    out = run_cli("experiment=fantasy_art_lora", "optimizer.lr=2e-4", "stage=compile", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    rc, result, _ = diff_json(str(run), "fantasy_art_lora optimizer.lr=2e-4")
    assert rc == 0 and result["identical"] and not result["config_hash"]["differs"]
    text = run_main("diff", str(run), "fantasy_art_lora")
    assert text.returncode == 1
    assert "LEARNING_RATE: 0.0002 -> 0.0001   [yaml: optimizer.lr]" in text.stdout
    assert "config hash differs" in text.stdout


def test_header_only_differences_are_not_setting_differences(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, extra in ((a, []), (b, ["trainer.new_run=false"])):
        out = run_cli("experiment=fantasy_art", "stage=compile", f"hydra.run.dir={run}", *extra)
        assert out.returncode == 0, out.stderr
    env_b = b / "config" / "config.env"
    env_b.write_text(env_b.read_text().replace("# overrides: (none)", "# overrides: seed=42")
                     .replace("sha256: ", "sha256: 0"))
    out = run_main("diff", str(a), str(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "config hash differs" in out.stdout and "identical settings" in out.stdout


def test_unknown_experiment_is_an_error_with_exit_status_2():
    out = run_cli("diff", "no_such_experiment", "fantasy_art")
    assert out.returncode == 2 and "no_such_experiment" in out.stderr


def test_diff_never_writes_into_outputs(tmp_path):
    out = run_cli("diff", "fantasy_art", "fantasy_art seed=1", env={"SD3EXP_ROOT": str(tmp_path)})
    assert out.returncode == 1 and "TRAINING_SEED: 42 -> 1" in out.stdout
    assert not (tmp_path / "outputs").exists()
