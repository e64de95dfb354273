"""`sd3exp lock` / `sd3exp lock --check`: the committed compiled/ snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

from sd3exp.project import ROOT
from tests.helpers import run_cli, run_main


def project_copy(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    out = run_main("lock", "--root", str(root))
    assert out.returncode == 0, out.stderr
    return root


def test_the_committed_snapshot_is_current():
    out = run_cli("lock", "--check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_snapshot_is_machine_independent(tmp_path):
    root = project_copy(tmp_path)
    for exp in (ROOT / "compiled").iterdir():
        for f in exp.rglob("*"):
            if f.is_file():
                assert (root / "compiled" / exp.name / f.relative_to(exp)).read_bytes() == f.read_bytes(), f
    assert str(tmp_path) not in "".join(p.read_text() for p in (root / "compiled").rglob("*") if p.is_file())


def test_editing_an_experiment_fails_the_check_naming_it(tmp_path):
    root = project_copy(tmp_path)
    yaml = root / "conf" / "experiment" / "cinema_photo.yaml"
    yaml.write_text(yaml.read_text().replace("batch_size: 4", "batch_size: 2"))
    out = run_main("lock", "--check", "--root", str(root))
    assert out.returncode == 1
    assert "cinema_photo: config/config.env differs" in out.stdout
    assert "-TRAIN_BATCH_SIZE=4" in out.stdout and "+TRAIN_BATCH_SIZE=2" in out.stdout
    assert "fantasy_art:" not in out.stdout


def test_missing_and_stale_snapshots_fail(tmp_path):
    root = project_copy(tmp_path)
    shutil.copy(root / "conf" / "experiment" / "fantasy_art.yaml", root / "conf" / "experiment" / "new_one.yaml")
    shutil.copytree(root / "compiled" / "cinema_photo", root / "compiled" / "removed_one")
    out = run_main("lock", "--check", "--root", str(root))
    assert out.returncode == 1
    assert "new_one: no snapshot" in out.stdout and "removed_one: compiled/removed_one is stale" in out.stdout
    assert run_main("lock", "--root", str(root)).returncode == 0
    assert run_main("lock", "--check", "--root", str(root)).returncode == 0
    assert not (root / "compiled" / "removed_one").exists()


def test_resolved_yaml_is_written_as_omegaconf_writes_it():
    """sd3exp.job.dump_yaml skips OmegaConf's config building, not its YAML: strings YAML would read as
    something else stay quoted, unicode stays as it is."""
    from omegaconf import OmegaConf

    from sd3exp.job import dump_yaml

    data = {"name": "fantasy_art", "lr": 1.5e-05, "flags": ["yes", "no", "1e-5", "null", "~", "on"], "empty": "",
            "caption": "k4s4, été, 夜", "none": None, "nested": {"steps": [800, 1600], "text": "a: b # c", "t": True}}
    assert dump_yaml(data) == OmegaConf.to_yaml(data)
