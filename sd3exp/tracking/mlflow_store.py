"""MLflow: one MLflow run per run folder and config, updated in place by every evaluation (what the run
lacks is logged, nothing twice); a multirun is a parent run with its jobs' runs as children."""

from __future__ import annotations

import os
import re
import shlex
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# A server that is down is reported at once instead of after minutes of retries (a user's setting wins).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: E402

from sd3exp.io import dumps_json, read_json, write_if_changed  # noqa: E402
from sd3exp.tracking.record import TAG, RunRecord  # noqa: E402

RUN_FILE = "mlflow.json"  # in the run folder: {uri: {"run_id", "key"}}
SWEEP_FILE = "mlflow.json"  # in the multirun folder, beside sweep.json: {uri: parent run id}
RUN_KEY = f"{TAG}run_key"
PARENT = "mlflow.parentRunId"
BATCH = 100  # params or tags per log_batch call (MLflow's limit); metrics go 1000 at a time


def ui_command(uri: str) -> str:
    """The command that shows the store: `mlflow ui` for a local one, the server's own page otherwise."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return shlex.join(["mlflow", "ui", "--backend-store-uri", uri])


def experiment_id(client: MlflowClient, uri: str, name: str, output_root: str) -> str:
    """The MLflow experiment `name`, made when missing (a local store keeps artifacts beside mlflow.db)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    local = not uri.startswith(("http://", "https://", "databricks"))
    location = (Path(output_root).resolve() / "mlartifacts" / name).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job made it meanwhile
        made = client.get_experiment_by_name(name)
        if made is None:
            raise
        return made.experiment_id


def _ids(path: Path) -> Dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def stored_run(run_dir: Path, uri: str) -> Optional[Dict[str, str]]:
    """The run id this run folder was logged under in `uri` (and the key it was logged with)."""
    return _ids(run_dir / RUN_FILE).get(uri)


def _live(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def find_run(client: MlflowClient, uri: str, exp_id: str, record: RunRecord, run_dir: Path) -> str:
    """The run's MLflow run: the one recorded in the run folder, else the one tagged with its key, else a new one."""
    stored = stored_run(run_dir, uri)
    if stored and stored["key"] == record.key and _live(client, stored["run_id"]):
        run_id = stored["run_id"]
    else:
        found = client.search_runs([exp_id], f"tags.`{RUN_KEY}` = '{record.key}'", max_results=1)
        run_id = found[0].info.run_id if found else client.create_run(
            exp_id, run_name=record.name, tags={RUN_KEY: record.key}).info.run_id
    ids = {**_ids(run_dir / RUN_FILE), uri: {"run_id": run_id, "key": record.key}}
    write_if_changed(run_dir / RUN_FILE, dumps_json(ids))
    return run_id


def missing_metrics(client: MlflowClient, run_id: str, metrics: Iterable[Tuple[str, float, int]]) -> List[Metric]:
    """The metrics the run does not hold yet (same key, step and value)."""
    by_key: Dict[str, List[Tuple[float, int]]] = defaultdict(list)
    for key, value, step in metrics:
        by_key[key].append((value, step))
    now, out = int(time.time() * 1000), []
    for key, points in by_key.items():
        have = {(m.value, m.step) for m in client.get_metric_history(run_id, key)}
        out += [Metric(key, v, now, s) for v, s in dict.fromkeys(points) if (v, s) not in have]
    return out


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    return (items[i:i + size] for i in range(0, len(items), size))


def param_key(key: str) -> str:
    """A config key as MLflow accepts it: letters, digits, _ - . and spaces (a slash would make MLflow
    read the name as a path: 'a/' and 'a//b' are refused)."""
    return re.sub(r"[^\w\-. ]", "_", key)


def log_batch(client: MlflowClient, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
              tags: Mapping[str, str] = {}) -> None:
    for part in _chunks(list(params), BATCH):
        client.log_batch(run_id, params=list(part))
    for part in _chunks([RunTag(k, v) for k, v in tags.items()], BATCH):
        client.log_batch(run_id, tags=list(part))
    for part in _chunks(list(metrics), 1000):
        client.log_batch(run_id, metrics=list(part))


def log(uri: str, experiment: str, record: RunRecord, run_dir: Path, output_root: str) -> str:
    """Log (or complete) the run's MLflow run; returns its id."""
    client = MlflowClient(tracking_uri=uri)
    run_id = find_run(client, uri, experiment_id(client, uri, experiment, output_root), record, run_dir)
    held = client.get_run(run_id).data.params
    values = {param_key(k): v[:MAX_PARAM_VAL_LENGTH] for k, v in record.params.items()}
    params = [Param(k, v) for k, v in values.items() if k not in held]
    # a param is fixed once logged: an evaluation setting changed since shows as a tag
    changed = {f"{TAG}now.{k}": v[:5000] for k, v in values.items() if k in held and held[k] != v}
    log_batch(client, run_id, missing_metrics(client, run_id, record.metrics), params, {**record.tags, **changed})
    for path, folder in record.artifacts:
        client.log_artifact(run_id, str(path), folder or None)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def parent_run(uri: str, experiment: str, sweep_dir: Path, output_root: str) -> str:
    """The multirun's parent run, made once (its id kept in the sweep folder)."""
    client = MlflowClient(tracking_uri=uri)
    ids = _ids(sweep_dir / SWEEP_FILE)
    if uri in ids and _live(client, ids[uri]):
        return ids[uri]
    exp_id = experiment_id(client, uri, experiment, output_root)
    run_id = client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}",
                               tags={f"{TAG}sweep_dir": str(sweep_dir.resolve())}).info.run_id
    write_if_changed(sweep_dir / SWEEP_FILE, dumps_json({**ids, uri: run_id}))
    return run_id


def link_sweep(uri: str, experiment: str, sweep_dir: Path, output_root: str, summary: Mapping[str, Any]) -> None:
    """The jobs' runs as children of the parent; per job its objective (metric `objective` at step = job
    number) and the best job so far (metric `best_objective`, tags) on the parent."""
    parent = parent_run(uri, experiment, sweep_dir, output_root)
    client = MlflowClient(tracking_uri=uri)
    metrics: List[Tuple[str, float, int]] = []
    for job in summary["jobs"]:
        child = stored_run(sweep_dir / job["run_dir"], uri)
        if child and _live(client, child["run_id"]):
            client.set_tag(child["run_id"], PARENT, parent)
            client.set_tag(child["run_id"], f"{TAG}sweep_job", str(job["num"]))
        if job["best"] and job["best"]["score"] is not None:
            metrics.append(("objective", float(job["best"]["score"]), int(job["num"])))
    tags = {f"{TAG}swept": ", ".join(summary["swept"]), f"{TAG}jobs": str(len(summary["jobs"]))}
    ranked = [j for j in summary["jobs"] if j["rank"] == 1]
    if ranked:
        best = ranked[0]
        tags.update({f"{TAG}best_job": str(best["num"]), f"{TAG}best_run_dir": best["run_dir"],
                     f"{TAG}objective": best["best"]["objective"]})
        metrics.append(("best_objective", float(best["best"]["score"]), len(summary["jobs"])))
    held = client.get_run(parent).data.params
    params = [Param(param_key(f"common.{k}"), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in summary["common"].items()
              if param_key(f"common.{k}") not in held]
    log_batch(client, parent, missing_metrics(client, parent, metrics), params, tags)
    for name in ("sweep.json", "sweep.html"):
        if (sweep_dir / name).is_file():
            client.log_artifact(parent, str(sweep_dir / name))
