"""config.env quoting: every written value means the same to bash and to SimpleTuner."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd3exp import envfile
from sd3exp.errors import UnsafeValueError
from tests.helpers import needs_trainer, trainer_python
from tests.simpletuner_envfile import as_argument

HOSTILE = ["$(touch pwned)", "`touch pwned`", "a\nTOUCH=1", "it's", 'say "hi"', "a  b", " lead", "trail ",
           "x+=y", "{env:HOME}", "back\\slash", "$HOME", "tab\there", "true", "False", "", "semi;colon touch pwned",
           "a | b", "a & b", "#hash", "glob *", "~user", "k4s4, castle; (oil) [painting] <x> ! ? %", "a=b", "ünïcødé ✓"]
ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))


def bash_value(tmp_path: Path, line: str) -> str:
    env_file = tmp_path / "config.env"
    env_file.write_text(line + "\n")
    out = subprocess.run(["bash", "-c", 'source ./config.env && printf %s "$V"'], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def check_both_readers(tmp_path: Path, value: str) -> None:
    before = set(tmp_path.iterdir())
    try:
        encoded = envfile.encode("field", value)
    except UnsafeValueError as err:
        assert "field=" in str(err) and "Fix:" in str(err)
        return
    line = f"V={encoded}"
    assert bash_value(tmp_path, line) == value
    assert as_argument(line, "V", {"HOME": "/root"}) == value
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "config.env"}, "sourcing created a file"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_refused_or_exact(tmp_path, value):
    check_both_readers(tmp_path, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(ALPHABET, max_size=30))
def test_random_text_is_refused_or_exact(tmp_path, value):
    check_both_readers(tmp_path, value)


def test_plain_prompt_is_accepted_and_quoted():
    assert envfile.encode("p", "k4s4, a castle at dusk") == "'k4s4, a castle at dusk'"
    assert envfile.encode("lr", 1.5e-05) == "1.5e-05"


@needs_trainer
def test_real_simpletuner_parser_agrees(tmp_path):
    """The real parse_env_file/load_env_config read every accepted hostile value unchanged."""
    accepted = {}
    for i, value in enumerate(HOSTILE):
        try:
            accepted[f"VALIDATION_PROMPT_{i}"] = (value, envfile.encode("p", value))
        except UnsafeValueError:
            continue
    (tmp_path / "config.env").write_text("".join(f"{k}={enc}\n" for k, (_, enc) in accepted.items()))
    code = ("import json, sys; from simpletuner.helpers.configuration.env_file import parse_env_file;"
            "print(json.dumps({k: ' '.join(v) for k, v in parse_env_file('config.env').items()}))")
    out = subprocess.run([str(trainer_python()), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: parsed[k] for k in accepted} == {k: v for k, (v, _) in accepted.items()}
