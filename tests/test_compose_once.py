"""sd3exp composes a run once and its default sweeper each job of a multirun at most once (sd3exp/compose_once.py),
where Hydra composes a run twice (to read hydra.mode, then to run it) and its basic sweeper each job twice
(the batch check, then the launch); jobs that differ only in values share one composition of their config
groups. The same run and job folders and configs, and a batch with a job that cannot be composed still
refused before any job runs."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from sd3exp.compose_once import ComposedOnce
from sd3exp.project import CONF_DIR, ROOT
from tests.helpers import CountingLoader, node_flags

# Counts Hydra's own compositions of jobs (ConfigLoaderImpl.load_sweep_config) and of whole configs
# (load_configuration), then runs the CLI; HYDRAS_RUN=1: without sd3exp's get_mode (Hydra's two compositions).
COUNTING = textwrap.dedent("""
    import atexit, os, sys
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    import sd3exp.compose_once
    composed = {"jobs": 0, "configs": 0}
    def counting(method, what):
        def counted(*args, **kwargs):
            composed[what] += 1
            return method(*args, **kwargs)
        return counted
    ConfigLoaderImpl.load_sweep_config = counting(ConfigLoaderImpl.load_sweep_config, "jobs")
    ConfigLoaderImpl.load_configuration = counting(ConfigLoaderImpl.load_configuration, "configs")
    if os.environ.get("HYDRAS_RUN") == "1":
        sd3exp.compose_once.compose_runs_once = lambda: None
    atexit.register(lambda: print(f"jobs composed: {composed['jobs']}", file=sys.stderr))
    atexit.register(lambda: print(f"configs composed: {composed['configs']}", file=sys.stderr))
    sys.argv = ["sd3exp", *sys.argv[1:]]
    from sd3exp.cli import main
    main()
""")


def counted(*args: str, hydras_run: bool = False, cache: Optional[Path] = None
            ) -> Tuple[subprocess.CompletedProcess, Dict[str, int]]:
    env = {**os.environ, "HYDRAS_RUN": "1" if hydras_run else "0", **({"XDG_CACHE_HOME": str(cache)} if cache else {})}
    done = subprocess.run([sys.executable, "-c", COUNTING, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    counts = {line.split(" composed: ")[0]: int(line.split(": ")[1]) for line in done.stderr.splitlines()
              if " composed: " in line}
    return done, counts


def sweep(*args: str) -> Tuple[subprocess.CompletedProcess, int]:
    done, counts = counted(*args)
    return done, counts["jobs"]


def compiled(job: Path) -> Dict[str, bytes]:
    """The job's compiled files, its sweep folder's path written as SWEEP (the files name their run folder)."""
    here = str(job.parent).encode()
    return {str(p.relative_to(job)): p.read_bytes().replace(here, b"SWEEP")
            for p in sorted((job / "config").rglob("*")) if p.is_file()}


def job_folders(sweep_dir: Path) -> List[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_grid_of_values_is_composed_once_and_compiles_what_hydras_basic_sweeper_compiles(tmp_path):
    grid = ["-m", "experiment=fantasy_art_lora", "lora.rank=4,8,16", "optimizer.lr=1e-4,2e-4", "stage=compile"]
    ours, ours_composed = sweep(*grid, f"hydra.sweep.dir={tmp_path / 'ours'}")
    hydras, hydras_composed = sweep(*grid, "hydra/sweeper=basic", f"hydra.sweep.dir={tmp_path / 'basic'}")
    assert ours.returncode == 0, ours.stderr
    assert hydras.returncode == 0, hydras.stderr
    assert (ours_composed, hydras_composed) == (1, 12)  # the groups once for 6 jobs, against each job twice
    ours_jobs, hydras_jobs = job_folders(tmp_path / "ours"), job_folders(tmp_path / "basic")
    assert [p.name for p in ours_jobs] == [p.name for p in hydras_jobs] and len(ours_jobs) == 6
    for mine, theirs in zip(ours_jobs, hydras_jobs):
        assert compiled(mine) and compiled(mine) == compiled(theirs), mine.name


def test_a_job_that_cannot_be_composed_stops_the_batch_before_any_job_runs(tmp_path):
    broken = tmp_path / "conf" / "model" / "broken.yaml"  # a model file with a key the schema lacks
    broken.parent.mkdir(parents=True)
    broken.write_text("family: sd3\nno_such_key: 1\n")
    done, composed = sweep("-m", "--config-dir", str(tmp_path / "conf"), "experiment=fantasy_art_lora",
                           "model=tiny_sd3,broken", "stage=compile", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode != 0
    assert "no_such_key" in done.stderr
    assert composed == 2  # the batch check reached the second job, and nothing was launched
    assert job_folders(tmp_path / "sweep") == []


def test_a_run_is_composed_once_then_read_back_and_writes_what_hydras_two_compositions_write(tmp_path):
    """sd3exp composes a run once (then reads it back from the user's cache: sd3exp/compose_cache.py, with
    another run folder), where Hydra composes it twice; the same files either way."""
    folders, counts = {}, {}
    for way, run_dir in (("composed", "run"), ("read back", "run-2"), ("hydra", "run-2")):
        run = ["experiment=fantasy_art", "stage=compile", f"hydra.run.dir={tmp_path / run_dir}",
               f"paths.output_root={tmp_path / 'out'}"]
        done, composed = counted(*run, hydras_run=way == "hydra", cache=tmp_path / "cache")
        assert done.returncode == 0, done.stderr
        folders[way] = {str(p.relative_to(tmp_path / run_dir)): p.read_bytes()
                        for p in sorted((tmp_path / run_dir).rglob("*")) if p.is_file()}
        counts[way] = composed["configs"]
        shutil.rmtree(tmp_path / run_dir)  # the same paths, one after the other: the files name their run folder
    assert counts == {"composed": 1, "read back": 0, "hydra": 2}
    assert "config/config.env" in folders["read back"] and folders["read back"] == folders["hydra"]
    assert folders["composed"].keys() == folders["hydra"].keys()


def test_sweep_values_without_multirun_get_hydras_own_refusal(tmp_path):
    args = ["experiment=fantasy_art", "optimizer.lr=1e-4,2e-4", "stage=compile", f"hydra.run.dir={tmp_path / 'run'}"]
    ours, _ = counted(*args)
    hydras, _ = counted(*args, hydras_run=True)
    assert ours.returncode == hydras.returncode != 0
    assert "Ambiguous value for argument 'optimizer.lr=1e-4,2e-4'" in ours.stderr
    refusal = [line for line in ours.stderr.splitlines() if " composed: " not in line]
    assert refusal == [line for line in hydras.stderr.splitlines() if " composed: " not in line]
    assert not (tmp_path / "run").exists()


def test_a_loader_sent_to_a_job_process_carries_no_kept_configs():
    """submitit pickles the launcher's config loader into every job; the kept batch must not go with it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = ComposedOnce(GlobalHydra.instance().config_loader())
        master = loader.load_configuration("config", ["experiment=fantasy_art_lora"], RunMode.MULTIRUN)
        loader.check(master, [["lora.rank=4"], ["lora.rank=8"]])
        assert len(loader.checked) == 2
        sent = pickle.loads(pickle.dumps(loader))
        assert sent.checked == {}
        assert sent.load_sweep_config(master, ["lora.rank=8"]).lora.rank == 8
        assert loader.load_sweep_config(master, ["lora.rank=8"]) is not None and len(loader.checked) == 1
    GlobalHydra.instance().clear()


GRID = ["experiment=fantasy_art_lora", "stage=compile"]
BATCHES = {  # batch -> sd3exp's compositions
    "values": ([[*GRID, f"lora.rank={r}", f"optimizer.lr={lr}"] for r in (4, 8) for lr in (1e-4, 2e-4)], 1),
    "groups and values": ([[f"experiment={e}", f"lora.rank={r}", "stage=compile"]
                           for e in ("fantasy_art_lora", "demo_lora") for r in (4, 8)], 2),
    "a dict value": ([[*GRID, "eval.select={objective: clip_t}", f"lora.rank={r}"] for r in (4, 8)], 1),
    "a group deleted": ([[*GRID, "~hparams_search", f"lora.rank={r}"] for r in (4, 8)], 2),  # each composed whole
    "a hydra override": ([[*GRID, f"hydra.job.name=r{r}", f"lora.rank={r}"] for r in (4, 8)], 2),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_each_checked_job_is_the_config_hydra_composes_for_it(name):
    """The batch check's configs against Hydra's own composition of each job (load_sweep_config): the same
    YAML, hydra node included (its override list and override_dirname), and the same struct/readonly flags."""
    batch, compositions = BATCHES[name]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        hydras = GlobalHydra.instance().config_loader()
        master = hydras.load_configuration("config", ["hydra.mode=MULTIRUN"], RunMode.MULTIRUN)
        counting = CountingLoader(hydras)
        ours = ComposedOnce(counting)
        ours.check(master, batch)
        assert counting.composed == compositions
        for job in batch:
            mine, theirs = ours.checked[(id(master), tuple(job))], hydras.load_sweep_config(master, job)
            assert OmegaConf.to_yaml(mine) == OmegaConf.to_yaml(theirs), job
            assert mine.hydra.overrides.task == [o for o in job if not o.startswith("hydra.")]
            assert node_flags(mine) == node_flags(theirs), job
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("bad", ["lora.no_such_key=1", "lora.rank=abc", "eval.select={no_such: 1}"])
def test_a_value_hydra_refuses_is_refused_with_hydras_own_error(bad):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        hydras = GlobalHydra.instance().config_loader()
        master = hydras.load_configuration("config", ["hydra.mode=MULTIRUN"], RunMode.MULTIRUN)
        with pytest.raises(ConfigCompositionException) as theirs:
            hydras.load_sweep_config(master, [*GRID, bad])
        with pytest.raises(ConfigCompositionException) as mine:
            ComposedOnce(hydras).check(master, [[*GRID, "lora.rank=4"], [*GRID, bad]])
    GlobalHydra.instance().clear()
    assert str(mine.value) == str(theirs.value)
    assert str(mine.value.__cause__) == str(theirs.value.__cause__)


def sweeper_named(search: Path) -> str:
    """The sweeper an hparams_search file chooses (its `override /hydra/sweeper: X`), as its _target_."""
    choice = next(line.split(":", 1)[1].split("#")[0].strip() for line in search.read_text().splitlines()
                  if line.strip().startswith("- override /hydra/sweeper:"))
    sweeper = yaml.safe_load((CONF_DIR / "hydra" / "sweeper" / f"{choice}.yaml").read_text())
    return sweeper["_target_"]


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")))
def test_the_sweeper_an_hparams_search_file_chooses_is_the_one_hydra_runs(search):
    """An override of hydra/sweeper in the root config beats one in an hparams_search file (Hydra keeps the
    first): the default sweeper is chosen by the default hparams_search, so each file's choice stands."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", [f"hparams_search={search}"], return_hydra_config=True)
        default = compose("config", [], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.sweeper._target_ == sweeper_named(CONF_DIR / "hparams_search" / f"{search}.yaml")
    assert default.hydra.sweeper._target_ == "hydra_plugins.sd3exp_basic.BasicSweeper"
