"""A run's composition from the user's cache (sd3exp/compose_cache.py): the config Hydra composes for the same
command line, whether composed now or read back, and composed afresh when anything it was made from changes."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sd3exp import compose_cache
from sd3exp.compose_cache import cache_dir, cache_key, composed
from sd3exp.project import CONF_DIR
from tests.helpers import CountingLoader, node_flags


@pytest.fixture
def hydras(tmp_path, monkeypatch) -> Iterator[CountingLoader]:
    """Hydra's loader over sd3exp's conf/ (as the CLI sets it up), with an empty user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        yield CountingLoader(GlobalHydra.instance().config_loader())
    GlobalHydra.instance().clear()


def same_config(mine: DictConfig, theirs: DictConfig) -> None:
    assert OmegaConf.to_yaml(mine) == OmegaConf.to_yaml(theirs)
    assert node_flags(mine) == node_flags(theirs)


RUNS = {  # command line -> compositions of its config groups kept (a value-only line shares its groups')
    "groups and values": ["experiment=fantasy_art", "stage=compile", "hydra.run.dir=/tmp/somewhere", "optimizer.lr=2e-4"],
    "a preset and a dict": ["experiment=demo_lora", "memory=24gb", "eval.select={objective: clip_t}", "lora.rank=8"],
    "a hydra group and hydra values": ["experiment=fantasy_art", "hydra/launcher=slurm_gpu", "hydra.verbose=true",
                                       "hydra.job.chdir=false", "hydra.run.dir=/tmp/x"],
    "a group deleted (composed whole)": ["experiment=fantasy_art_lora", "~hparams_search", "lora.rank=4"],
    "a hydra key read while composing (composed whole)": ["experiment=fantasy_art", "hydra.job.name=mine"],
    "a key added (composed whole)": ["experiment=fantasy_art", "++stage=compile", "+hydra.job.env_set.SD3EXP_X=1"],
    "no overrides": [],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_composed_now_or_read_back_is_the_config_hydra_composes(hydras, name):
    overrides = RUNS[name]
    theirs = hydras.loader.load_configuration("config", overrides, RunMode.RUN)
    first = composed(hydras, "config", overrides)
    assert hydras.composed == 1
    same_config(first, theirs)
    second = composed(hydras, "config", overrides)
    assert hydras.composed == 1  # read back, not composed
    same_config(second, theirs)
    assert second is not first and len(list(cache_dir().glob("*.pickle"))) == 1


def test_command_lines_that_differ_only_in_values_share_one_composition(hydras):
    lines = [["experiment=fantasy_art_lora", f"lora.rank={r}", f"hydra.run.dir=/tmp/r{r}", "stage=compile"]
             for r in (4, 8, 16)]
    for overrides in lines:
        same_config(composed(hydras, "config", overrides), hydras.loader.load_configuration("config", overrides,
                                                                                             RunMode.RUN))
    assert hydras.composed == 1


def test_sweep_values_in_a_run_get_hydras_own_refusal(hydras):
    overrides = ["experiment=fantasy_art", "optimizer.lr=1e-4,2e-4"]
    with pytest.raises(ConfigCompositionException) as theirs:
        hydras.loader.load_configuration("config", overrides, RunMode.RUN)
    for _ in range(2):  # composed, then read back: refused both times
        with pytest.raises(ConfigCompositionException) as mine:
            composed(hydras, "config", overrides)
        assert str(mine.value) == str(theirs.value)


@pytest.fixture
def own_conf(tmp_path, monkeypatch) -> Iterator[tuple[Path, CountingLoader]]:
    """A copy of conf/ and Hydra's loader over it, with an empty user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        yield conf, CountingLoader(GlobalHydra.instance().config_loader())
    GlobalHydra.instance().clear()


def test_an_edited_added_or_removed_config_file_is_composed_afresh(own_conf):
    conf, hydras = own_conf
    line = ["experiment=fantasy_art", "stage=compile"]

    def check(lr: float) -> None:
        cfg = composed(hydras, "config", line)
        same_config(cfg, hydras.loader.load_configuration("config", line, RunMode.RUN))
        assert cfg.optimizer.lr == lr

    experiment = conf / "experiment" / "fantasy_art.yaml"
    check(OmegaConf.load(experiment).optimizer.lr)
    experiment.write_text(re.sub(r"(?m)^(optimizer:\n  lr: )\S+$", r"\g<1>0.000321", experiment.read_text()))
    check(0.000321)  # edited
    (conf / "local" / "default.yaml").write_text("# @package _global_\noptimizer:\n  lr: 0.000123\n")
    check(0.000123)  # added: the optional local config now found
    (conf / "local" / "default.yaml").unlink()
    check(0.000321)  # removed: the tree is as it was when edited, whose composition is read back
    assert hydras.composed == 3


def test_a_new_working_folder_hydra_variable_or_config_store_node_is_a_new_key(own_conf, tmp_path, monkeypatch):
    _, hydras = own_conf
    line = ["experiment=fantasy_art"]
    before = cache_key(hydras, "config", line)
    monkeypatch.chdir(tmp_path)
    moved = cache_key(hydras, "config", line)
    assert moved != before
    monkeypatch.setenv("HYDRA_DEPRECATION_WARNINGS_AS_ERRORS", "1")  # Hydra's warnings become errors
    assert cache_key(hydras, "config", line) != moved
    monkeypatch.delenv("HYDRA_DEPRECATION_WARNINGS_AS_ERRORS")
    cfg = composed(hydras, "config", line)
    assert cfg.hydra.runtime.cwd == str(tmp_path)
    ConfigStore.instance().store(name="sd3exp_test_node", node={"x": 1}, group="sd3exp_test_group")
    try:
        assert cache_key(hydras, "config", line) != moved
    finally:
        del ConfigStore.instance().repo["sd3exp_test_group"]
    assert cache_key(hydras, "config", line) == moved


def test_a_broken_cache_file_is_composed_again_and_replaced(hydras):
    line = ["experiment=fantasy_art"]
    theirs = hydras.loader.load_configuration("config", line, RunMode.RUN)
    composed(hydras, "config", line)
    entry, = cache_dir().glob("*.pickle")
    for broken in (b"", b"not a pickle", b"\x80\x04K\x01."):  # empty, garbage, a pickled int
        entry.write_bytes(broken)
        same_config(composed(hydras, "config", line), theirs)
        assert entry.read_bytes() != broken
    assert hydras.composed == 4


@pytest.mark.parametrize("line", [
    ["experiment=fantasy_art", f"hydra.searchpath=[file://{CONF_DIR}]"],  # folders named inside the config
    ["experiment=fantasy_art", "hydra.job.env_copy=[HOME]"],  # a value from the environment
])
def test_a_composition_that_read_more_than_the_key_names_is_not_kept(hydras, line):
    same_config(composed(hydras, "config", line), hydras.loader.load_configuration("config", line, RunMode.RUN))
    assert not cache_dir().exists() or not list(cache_dir().glob("*.pickle"))


def test_an_unwritable_cache_still_composes(hydras, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    line = ["experiment=fantasy_art"]
    same_config(composed(hydras, "config", line), hydras.loader.load_configuration("config", line, RunMode.RUN))


def test_a_config_in_a_linked_folder_edited_is_composed_afresh(own_conf, tmp_path):
    conf, hydras = own_conf
    elsewhere = tmp_path / "experiments-elsewhere"
    shutil.move(conf / "experiment", elsewhere)
    (conf / "experiment").symlink_to(elsewhere, target_is_directory=True)
    line = ["experiment=fantasy_art"]
    assert composed(hydras, "config", line).optimizer.lr == OmegaConf.load(elsewhere / "fantasy_art.yaml").optimizer.lr
    experiment = elsewhere / "fantasy_art.yaml"
    experiment.write_text(re.sub(r"(?m)^(optimizer:\n  lr: )\S+$", r"\g<1>0.000456", experiment.read_text()))
    assert composed(hydras, "config", line).optimizer.lr == 0.000456
    assert hydras.composed == 2


def test_a_file_edited_while_composing_keeps_nothing(own_conf):
    conf, hydras = own_conf
    line = ["experiment=fantasy_art"]
    compose = hydras.load_configuration

    def edited_meanwhile(*args):
        cfg = compose(*args)
        (conf / "local" / "default.yaml").write_text("# @package _global_\noptimizer:\n  lr: 0.000789\n")
        return cfg

    hydras.load_configuration = edited_meanwhile  # type: ignore[method-assign]
    composed(hydras, "config", line)
    assert not cache_dir().exists() or not list(cache_dir().glob("*.pickle"))
    hydras.load_configuration = compose  # type: ignore[method-assign]
    assert composed(hydras, "config", line).optimizer.lr == 0.000789


def test_a_search_path_folder_of_too_many_files_is_not_digested(hydras, monkeypatch):
    monkeypatch.setattr(compose_cache, "MOST_FILES", 5)
    line = ["experiment=fantasy_art"]
    assert cache_key(hydras, "config", line) is None
    same_config(composed(hydras, "config", line), hydras.loader.load_configuration("config", line, RunMode.RUN))
    assert not cache_dir().exists() or not list(cache_dir().glob("*.pickle"))


def test_the_entries_kept_are_the_newest_used(hydras, monkeypatch):
    monkeypatch.setattr(compose_cache, "KEEP", 2)
    lines = [["experiment=fantasy_art"], ["experiment=demo"], ["experiment=demo_lora"]]
    for line in lines[:2]:
        composed(hydras, "config", line)
    first = cache_dir() / f"{cache_key(hydras, 'config', lines[0])}.pickle"
    os.utime(first, (1, 1))  # made long ago ...
    composed(hydras, "config", lines[0])  # ... and used now
    composed(hydras, "config", lines[2])
    kept = {p.name for p in cache_dir().glob("*.pickle")}
    assert kept == {f"{cache_key(hydras, 'config', line)}.pickle" for line in (lines[0], lines[2])}
    assert hydras.composed == 3
