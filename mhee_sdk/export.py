"""Export finished runs of a store to MLflow: config as params, metrics, the exit histogram and the Pareto plot.

Needs the ``mlflow`` extra (``pip install "mhee-sdk[mlflow]"``: mlflow-skinny and what its SQLite store needs).
Each store run becomes one MLflow run tagged ``mhee.run_id``; a run already exported to the experiment is
skipped, so exporting a store again adds only its new runs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mhee_sdk.report import runs_table, write_plots
from mhee_sdk.store import Store

DEFAULT_EXPERIMENT = "mhee-sdk"
RUN_ID_TAG = "mhee.run_id"
BATCH = 100  # MLflow takes at most 100 params per log_batch call


class ExtraNotInstalled(ImportError):
    """An optional dependency of a feature is missing; the message names the extra that installs it."""


@dataclass(frozen=True)
class ExportedRun:
    """One store run and the MLflow run that holds it; `new` is False when an earlier export made it."""

    run_id: str
    name: str
    mlflow_run_id: str
    new: bool


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"policy_params": {"threshold": 0.7}}`` -> ``policy_params.threshold``."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple | dict):
            params[name] = json.dumps(value, default=str)
        else:
            params[name] = str(value)
    return params


def export_mlflow(
    store: Store,
    run_ids: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> list[ExportedRun]:
    """Log finished runs (all, or these) to an MLflow experiment, creating it when missing.

    `tracking_uri`: None means MLflow's own default, ``$MLFLOW_TRACKING_URI`` or else ``sqlite:///mlflow.db``
    in the current folder with artifacts under ``./mlruns`` (MLflow 3 refuses a ``file:`` store unless
    ``MLFLOW_ALLOW_FILE_STORE=true`` is set).
    """
    client = _client(tracking_uri)
    table = runs_table(store)  # every finished run: the Pareto plot shows each exported run among all of them
    chosen = runs_table(store, run_ids) if run_ids else table  # raises, naming them, for unknown ids
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    exported = []
    with tempfile.TemporaryDirectory(prefix="mhee-export-") as folder:
        plots = {path.name: path for path in write_plots(store, table, folder)}
        for row in chosen.itertuples():
            done = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{row.run_id}'")
            if done:
                exported.append(ExportedRun(row.run_id, row.name, done[0].info.run_id, new=False))
                continue
            artifacts = [plots["pareto.png"]]
            if f"exits_{row.run_id}.png" in plots:  # baselines have no exit layers
                artifacts.append(plots[f"exits_{row.run_id}.png"])
            mlflow_run_id = _log_run(client, experiment_id, store, row.run_id, artifacts)
            exported.append(ExportedRun(row.run_id, row.name, mlflow_run_id, new=True))
    return exported


def _client(tracking_uri: str | None):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:  # a missing extra is a user's setup step, not a bug
        raise ExtraNotInstalled(
            f"exporting to MLflow needs the mlflow extra: pip install 'mhee-sdk[mlflow]' ({err})"
        ) from err
    return MlflowClient(tracking_uri)


def _log_run(client, experiment_id: str, store: Store, run_id: str, artifacts: Sequence[Path]) -> str:
    from mlflow.entities import Metric, Param

    record = store.run(run_id)
    started = _millis(record["created"])
    tags = {RUN_ID_TAG: run_id, "mhee.kind": str(record["kind"]), "mhee.store": str(store.path.resolve()),
            "mhee.requests_key": str(record["requests_key"])}  # fmt: skip
    if record.get("parent_run"):
        tags["mhee.parent_run"] = str(record["parent_run"])
    tags.update({f"mhee.version.{name}": str(version) for name, version in (record.get("versions") or {}).items()})
    run = client.create_run(experiment_id, start_time=started, tags=tags, run_name=str(record["name"]))
    mlflow_run_id = run.info.run_id
    params = flatten(record["config"])
    params.update({"exit_layers": json.dumps(record["exit_layers"]), "num_layers": str(record["num_layers"])})
    for chunk in _chunks([Param(key, value) for key, value in params.items()], BATCH):
        client.log_batch(mlflow_run_id, params=chunk)
    # MLflow metric names allow no "@": the slice metrics (auc@cold_items) become auc/cold_items
    values = store.metrics(run_id)
    metrics = [Metric(name.replace("@", "/"), float(value), started, 0) for name, value in values.items()]
    client.log_batch(mlflow_run_id, metrics=metrics)
    for path in artifacts:
        client.log_artifact(mlflow_run_id, str(path))
    client.set_terminated(mlflow_run_id, "FINISHED")
    return mlflow_run_id


def _millis(moment: Any) -> int | None:
    stamp = pd.Timestamp(moment)
    return None if pd.isna(stamp) else int(stamp.timestamp() * 1000)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
