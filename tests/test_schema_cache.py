"""Start-up shortcuts that must give what the slow way gives: the schema's node from the user's cache
(sd3exp/schema.py schema_node) against OmegaConf building it, and field_types' plain-type check against
OmegaConf's own judgement of a value."""

from __future__ import annotations

import dataclasses
import pickle
import typing
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from sd3exp import field_types
from sd3exp.schema import ExperimentConfig, schema_cache, schema_node
from tests.helpers import node_flags, run_cli


def same_as_built(node: DictConfig) -> None:
    built = OmegaConf.structured(ExperimentConfig)
    assert OmegaConf.get_type(node) is ExperimentConfig
    assert OmegaConf.to_yaml(node) == OmegaConf.to_yaml(built)
    assert node_flags(node) == node_flags(built)


def test_the_schema_is_built_once_then_read_from_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = schema_cache()
    assert path.parent == tmp_path / "sd3exp" / "schema" and not path.exists()
    same_as_built(schema_node())
    same_as_built(pickle.loads(path.read_bytes()))
    marked = OmegaConf.structured(ExperimentConfig)
    marked.stage = "marked"
    path.write_bytes(pickle.dumps(marked))
    assert schema_node().stage == "marked"  # read from the file, not built again


@pytest.mark.parametrize("content", [b"", b"not a pickle", pickle.dumps({"model": 1}),
                                     pickle.dumps(OmegaConf.create({"model": {}}))])
def test_a_broken_or_foreign_cache_file_is_built_again(tmp_path, monkeypatch, content):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = schema_cache()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    same_as_built(schema_node())
    assert OmegaConf.get_type(pickle.loads(path.read_bytes())) is ExperimentConfig  # replaced by the schema's


def test_a_cache_that_cannot_be_written_only_slows_the_start(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # XDG_CACHE_HOME is a file: no folder can be made under it
    run = tmp_path / "run"
    done = run_cli("experiment=fantasy_art", "stage=compile", f"hydra.run.dir={run}", env={"XDG_CACHE_HOME": str(blocked)})
    assert done.returncode == 0, done.stderr
    assert (run / "config" / "config.env").is_file()


def leaf_fields() -> List[Tuple[str, Any]]:
    """(dotted key, type) of every schema field that is not itself a dataclass or a list of them."""
    out, todo = [], [("", ExperimentConfig)]
    while todo:
        prefix, cls = todo.pop()
        for name, kind in typing.get_type_hints(cls).items():
            args = typing.get_args(kind)
            if dataclasses.is_dataclass(kind):
                todo.append((f"{prefix}{name}.", kind))
            elif args and dataclasses.is_dataclass(args[0]):
                todo.append((f"{prefix}{name}.0.", args[0]))
            else:
                out.append((f"{prefix}{name}", kind))
    return sorted(out, key=lambda kv: kv[0])


LEAVES = leaf_fields()
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                   st.sampled_from(["1e-4", "true", "${name}", "8", "1.5"]))


def omegaconfs_judgement(key: str, value: Any) -> bool:
    found = field_types._field(key)
    assert found is not None, key
    node, leaf = found
    try:
        node[leaf] = value
        return True
    except Exception:  # noqa: BLE001 - any refusal is a refusal
        return False


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(LEAVES), value=VALUES)
def test_a_value_of_the_fields_plain_type_is_one_omegaconf_takes(field, value):
    key, _ = field
    if field_types._field(key) is None:  # a dict field's own key: nothing to judge
        return
    if field_types._plainly_fits(key, value):
        assert omegaconfs_judgement(key, value), (key, value)
    assert field_types._fits(key, value) == omegaconfs_judgement(key, value), (key, value)


def test_the_plain_check_answers_for_most_fields():
    """The shortcut is taken: an int, float, string or bool field's own type fits without a node."""
    plain = [k for k, kind in LEAVES if kind in (int, float, str, bool)]
    assert len(plain) > 20
    assert all(field_types._plainly_fits(k, {int: 1, float: 1.5, str: "x", bool: True}[dict(LEAVES)[k]]) for k in plain)


def test_the_command_line_keeps_the_schema_under_xdg_cache_home(tmp_path):
    run = tmp_path / "run"
    done = run_cli("experiment=fantasy_art", "stage=plan", f"hydra.run.dir={run}", env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert done.returncode == 0, done.stderr
    assert sorted(p.parent for p in Path(tmp_path / "c").rglob("*.pickle")) == [
        tmp_path / "c" / "sd3exp" / "composed", tmp_path / "c" / "sd3exp" / "schema"]  # the run's composition too
