"""Schema versions: a version-1 experiment still loads through a migration; newer ones fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3exp.errors import ConfigError
from sd3exp.migrate import migrate_text, v1_to_v2
from tests.helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "experiment" / "fantasy_art_v1.yaml"


def settings(run: Path) -> list:
    env = (run / "config" / "config.env").read_text().splitlines()
    return [line for line in env if not line.startswith("#") and not line.startswith("TRACKER_RUN_NAME=")]


def test_v1_experiment_compiles_like_its_v2_counterpart_with_a_notice(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    old = run_cli("--config-dir", str(FIXTURES), "experiment=fantasy_art_v1", "stage=compile",
                  f"hydra.run.dir={tmp_path / 'v1'}", env=env)
    assert old.returncode == 0, old.stderr
    assert f"{V1} uses schema_version 1" in old.stderr
    assert "training.train_batch_size -> training.batch_size" in old.stderr
    assert "concepts[0].num_repeats -> repeats" in old.stderr
    new = run_cli("experiment=fantasy_art", "stage=compile", f"hydra.run.dir={tmp_path / 'v2'}")
    assert new.returncode == 0, new.stderr
    assert settings(tmp_path / "v1") == settings(tmp_path / "v2")
    assert "schema_version: 2" in (tmp_path / "v1" / "resolved.yaml").read_text()


def test_current_experiments_are_not_migrated(tmp_path):
    out = run_cli("experiment=fantasy_art", "stage=plan", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert out.returncode == 0 and "migration" not in out.stderr and not (tmp_path / "sd3exp" / "migrated-conf").exists()


def test_a_newer_schema_version_fails_clearly(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "future.yaml").write_text("# @package _global_\nschema_version: 3\n")
    out = run_cli("--config-dir", str(tmp_path), "experiment=future", "stage=plan",
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert out.returncode == 2
    assert "future.yaml: schema_version=3" in out.stderr and "newer sd3exp" in out.stderr


def test_migration_keeps_the_package_header_and_renames_keys():
    text, notes = migrate_text(V1, V1.read_text())
    assert text.startswith("# @package _global_\n")
    assert "train_batch_size:" not in text and "batch_size: 6" in text and "trigger: k4s4" in text
    assert len(notes) == 5


def test_setting_both_the_old_and_new_name_is_refused():
    with pytest.raises(ConfigError, match="both training.train_batch_size"):
        v1_to_v2({"training": {"train_batch_size": 2, "batch_size": 4}})
