"""MLflow and TensorBoard logging of runs and sweeps (tracking.mlflow.*, tracking.tensorboard.*).

The entry is `log_run` (after an evaluation) and, for a multirun, `sweep_started` / `sweep_job_ended`
(sd3exp/sweep.py's callback). MLflow and TensorBoard are imported only here, when something is
logged; a tracker that fails never fails the run: it is named in a warning and the next run catches up
(everything missing from the tracker is logged again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from sd3exp import console
from sd3exp.schema import ExperimentConfig, MlflowConfig
from sd3exp.stage_table import STAGES


def store_uri(mlflow: MlflowConfig, output_root: str) -> str:
    """tracking.mlflow.uri, or the local SQLite store in the output folder."""
    return mlflow.uri or f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def logdir(run_dir: Path, output_root: str) -> Path:
    """The folder to give `tensorboard --logdir`: the output folder, or the run's parent when it lies elsewhere."""
    root = Path(output_root).resolve()
    return root if root in run_dir.resolve().parents else run_dir.resolve().parent


def _failed(tracker: str, where: str, err: BaseException, again: Optional[str]) -> str:
    if isinstance(err, ImportError):
        key = "mlflow" if tracker == "MLflow" else "tensorboard"
        return (f"{tracker} is not installed ({err}): install it with `pip install -e '.[tracking]'`, "
                f"or turn it off with tracking.{key}.enabled=false")
    line = f"{tracker} at {where} failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    return line + (f"; nothing else is affected, the next run catches up (e.g. `{again}`)" if again else "")


def log_run(cfg: ExperimentConfig, run_dir: Path, config_hash: str, overrides: List[str],
            training: List[Dict[str, Any]], again: Optional[str] = None) -> List[str]:
    """Log the evaluated run to the trackers that are on; returns the lines for the summary
    (a failure is warned about here and not raised). `training`: SimpleTuner's metric records."""
    from sd3exp.tracking.record import run_record

    tr = cfg.tracking
    if not (tr.mlflow.enabled or tr.tensorboard.enabled):
        return []
    record = run_record(cfg, run_dir, config_hash, overrides, training)
    lines: List[str] = []
    if tr.mlflow.enabled:
        uri = store_uri(tr.mlflow, cfg.paths.output_root)
        try:
            from sd3exp.tracking import mlflow_store

            run_id = mlflow_store.log(uri, tr.mlflow.experiment or cfg.name, record, run_dir, cfg.paths.output_root)
            lines.append(f"mlflow: run {run_id} in {uri}; open it with `{mlflow_store.ui_command(uri)}`")
        except Exception as err:  # noqa: BLE001 - a tracker never fails training or evaluation
            console.warn(_failed("MLflow", uri, err, again))
            lines.append(f"mlflow: NOT logged ({uri} failed, see the warning above)")
    if tr.tensorboard.enabled:
        try:
            from sd3exp.tracking import tensorboard_events

            folder = tensorboard_events.write(record, run_dir)
            lines.append(f"tensorboard: {folder}; open with `tensorboard --logdir {logdir(run_dir, cfg.paths.output_root)}`")
        except Exception as err:  # noqa: BLE001
            console.warn(_failed("TensorBoard", str(run_dir), err, again))
    return lines


def _enabled(config: Any) -> Optional[str]:
    """The MLflow uri of a Hydra job/multirun config when tracking.mlflow is on and its stage evaluates
    (a sweep of stage=compile, say, has nothing to log), else None."""
    from omegaconf import OmegaConf

    if not OmegaConf.select(config, "tracking.mlflow.enabled", default=False, throw_on_resolution_failure=False):
        return None
    stage = OmegaConf.select(config, "stage", default=None, throw_on_resolution_failure=False)
    if stage in STAGES and not STAGES[stage].evaluates:
        return None
    uri = OmegaConf.select(config, "tracking.mlflow.uri", default=None, throw_on_resolution_failure=False)
    return store_uri(MlflowConfig(uri=uri), output_root(config))


def output_root(config: Any) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.select(config, "paths.output_root", default=None, throw_on_resolution_failure=False)
               or "outputs")


def experiment_of(config: Any) -> str:
    """The MLflow experiment of a Hydra config: tracking.mlflow.experiment, else the experiment's name."""
    from omegaconf import OmegaConf

    return str(OmegaConf.select(config, "tracking.mlflow.experiment", default=None, throw_on_resolution_failure=False)
               or OmegaConf.select(config, "name", default=None, throw_on_resolution_failure=False) or "default")


def sweep_started(config: Any, sweep_dir: Path) -> None:
    """A multirun begins: its MLflow parent run (created once, its id kept in the sweep folder)."""
    uri = _enabled(config)
    if uri is None:
        return
    name, root = experiment_of(config), output_root(config)
    try:
        from sd3exp.tracking import mlflow_store

        mlflow_store.parent_run(uri, name, sweep_dir, root)
    except Exception as err:  # noqa: BLE001
        console.warn(_failed("MLflow", uri, err, None) + "; the sweep's parent run is made when a job ends")


def sweep_job_ended(config: Any, sweep_dir: Path, summary: Mapping[str, Any]) -> None:
    """A job of the multirun ended: its run becomes a child of the parent, the objective goes on the parent."""
    uri = _enabled(config)
    if uri is None:
        return
    name, root = experiment_of(config), output_root(config)
    try:
        from sd3exp.tracking import mlflow_store

        mlflow_store.link_sweep(uri, name, sweep_dir, root, summary)
    except Exception as err:  # noqa: BLE001
        console.warn(_failed("MLflow", uri, err, None))
