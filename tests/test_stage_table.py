"""The stage table (sd3exp/stage_table.py) is what validate, the pipeline and the help text use."""

from __future__ import annotations

import pytest

from sd3exp import stages
from sd3exp.errors import ConfigError
from sd3exp.stage_table import STAGES, TABLE
from sd3exp.validate import validate
from tests.helpers import compose_experiment, run_cli


def test_every_step_of_every_stage_has_its_function():
    for stage in TABLE:
        for name in stage.steps:
            assert callable(stages.step(name)), (stage.name, name)
    assert set(stages.STEPS) == {name for stage in TABLE for name in stage.steps}


def test_validate_accepts_exactly_the_stages_of_the_table():
    for name in STAGES:
        validate(compose_experiment("demo_quick", [f"stage={name}"]))
    with pytest.raises(ConfigError, match=", ".join(STAGES)):
        validate(compose_experiment("demo_quick", ["stage=evaluate"]))


def test_the_help_lists_the_stages_of_the_table():
    out = run_cli("--help").stdout
    assert f"Stages (stage=...): {', '.join(STAGES)} (default)." in out
