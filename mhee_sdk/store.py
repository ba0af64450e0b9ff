"""The evaluation store: one DuckDB file of runs, predictions, per-layer head outputs, metrics and timings.

DuckDB lets one process write or many read, so the store never holds the file open: every call
connects, does its work and closes. A run writing batch by batch and a notebook reading between
batches can therefore share a file. A run is ``running`` until finished; one interrupted is marked
``failed`` with its error and never counted; a finished run is immutable.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from mhee_sdk.exits.policies import FULL_DEPTH
from mhee_sdk.exits.policies import replay as replay_policy
from mhee_sdk.interfaces import ExitPolicy
from mhee_sdk.metrics import auc_of_ranks, summarize

SCHEMA_VERSION = 1
DEFAULT_PATH = "mhee_runs.duckdb"

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, status VARCHAR, created TIMESTAMP,
    finished TIMESTAMP, config VARCHAR, versions VARCHAR, exit_layers VARCHAR, num_layers INTEGER,
    requests_key VARCHAR, parent_run VARCHAR, error VARCHAR);
CREATE TABLE IF NOT EXISTS predictions (
    run_id VARCHAR, request_id BIGINT, "user" BIGINT, item BIGINT, label INTEGER, prob DOUBLE,
    exit_layer INTEGER, latency_s DOUBLE);
CREATE TABLE IF NOT EXISTS layer_outputs (
    run_id VARCHAR, request_id BIGINT, layer INTEGER, head VARCHAR, prob DOUBLE);
CREATE TABLE IF NOT EXISTS requests (
    run_id VARCHAR, request_id BIGINT, prompt VARCHAR, retrieved VARCHAR);
CREATE TABLE IF NOT EXISTS metrics (run_id VARCHAR, name VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS timings (run_id VARCHAR, stage VARCHAR, seconds DOUBLE, requests INTEGER);
"""

_COLUMNS = {
    "predictions": ["request_id", "user", "item", "label", "prob", "exit_layer", "latency_s"],
    "layer_outputs": ["request_id", "layer", "head", "prob"],
    "requests": ["request_id", "prompt", "retrieved"],
}


class StoreError(RuntimeError):
    """The store file is unusable, or an operation is not allowed (e.g. writing a finished run)."""


@dataclass(frozen=True)
class ReplayResult:
    """A policy replayed over a logged full-depth run: per-request exits and the run's metrics."""

    predictions: pd.DataFrame  # request_id, user, label, prob, exit_layer
    metrics: dict[str, float]


def _versions() -> dict[str, str]:
    names = ["mhee-sdk", "torch", "transformers", "duckdb", "scikit-learn"]
    return {name: package_version(name) for name in names}


class Store:
    """A DuckDB evaluation store at `path`. Use [`open`][mhee_sdk.store.Store.open]."""

    def __init__(self, path: str | Path, read_only: bool) -> None:
        self.path = Path(path)
        self.read_only = read_only
        # finished runs are immutable, so what is read from them can be cached
        self._matrices: dict[str, tuple] = {}
        self._ranks: dict[str, tuple[np.ndarray, int]] = {}  # per run: dense ranks of the matrix, level count
        self._num_layers: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | Path = DEFAULT_PATH, read_only: bool = False) -> Store:
        """Open (creating when writable) and check the schema version."""
        store = cls(path, read_only)
        if read_only and not store.path.is_file():
            raise StoreError(f"{store.path} does not exist; run an evaluation first (e.g. `mhee demo`)")
        with store._connect() as con:
            if not read_only:
                con.execute(SCHEMA)
                if con.execute("SELECT count(*) FROM schema_version").fetchall()[0][0] == 0:
                    con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
            try:
                found = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
            except duckdb.CatalogException as err:
                raise StoreError(f"{store.path} is a DuckDB file but not an mhee store (no schema_version)") from err
        if found is None or found > SCHEMA_VERSION:
            raise StoreError(
                f"{store.path} has store schema {found}, newer than this mhee-sdk understands ({SCHEMA_VERSION}); "
                "upgrade mhee-sdk"
            )
        return store

    @contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            con = duckdb.connect(str(self.path), read_only=self.read_only)
        except duckdb.IOException as err:
            text = str(err)
            if "lock" in text.lower():
                raise StoreError(
                    f"{self.path} is in use by another writer; try again when it finishes ({text})"
                ) from err
            raise StoreError(f"{self.path} is not a readable DuckDB file (corrupt or not a database): {text}") from err
        except duckdb.Error as err:
            raise StoreError(f"cannot open {self.path}: {err}") from err
        try:
            yield con
        finally:
            con.close()

    # ------------------------------------------------------------------ writing
    def start_run(
        self,
        config: dict[str, Any],
        exit_layers: Sequence[int],
        num_layers: int,
        name: str = "",
        kind: str = "live",
        requests_key: str = "",
        parent_run: str | None = None,
    ) -> str:
        """Create a ``running`` run; returns its id."""
        self._check_writable()
        run_id = uuid.uuid4().hex[:12]
        with self._connect() as con:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, 'running', ?, NULL, ?, ?, ?, ?, ?, ?, NULL)",
                [
                    run_id,
                    name,
                    kind,
                    datetime.now(UTC).replace(tzinfo=None),
                    json.dumps(config, sort_keys=True),
                    json.dumps(_versions()),
                    json.dumps([int(x) for x in exit_layers]),
                    int(num_layers),
                    requests_key,
                    parent_run,
                ],
            )
        return run_id

    def append(self, run_id: str, table: str, frame: pd.DataFrame) -> None:
        """Bulk-insert rows (a DataFrame with the table's columns) into a running run."""
        if table not in _COLUMNS:
            raise ValueError(f"table {table!r} is not appendable; choose from: {', '.join(_COLUMNS)}")
        missing = [c for c in _COLUMNS[table] if c not in frame.columns]
        if missing:
            raise ValueError(f"{table} rows lack columns {missing}")
        rows = frame[_COLUMNS[table]].copy()
        rows.insert(0, "run_id", run_id)
        with self._connect() as con:
            self._check_running(con, run_id)
            con.register("incoming", rows)
            con.execute(f"INSERT INTO {table} SELECT * FROM incoming")

    def add_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Record named metric values for a running run."""
        frame = pd.DataFrame({"run_id": run_id, "name": list(metrics), "value": [float(v) for v in metrics.values()]})
        with self._connect() as con:
            self._check_running(con, run_id)
            con.register("incoming", frame)
            con.execute("INSERT INTO metrics SELECT * FROM incoming")

    def add_timing(self, run_id: str, stage: str, seconds: float, requests: int) -> None:
        """Record wall-clock seconds spent in a stage on `requests` requests."""
        with self._connect() as con:
            self._check_running(con, run_id)
            con.execute("INSERT INTO timings VALUES (?, ?, ?, ?)", [run_id, stage, float(seconds), int(requests)])

    def finish_run(self, run_id: str) -> None:
        """Mark a run finished; it cannot change afterwards."""
        self._set_status(run_id, "finished", None)

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark a run failed with its error; its rows stay for inspection but it is never reported."""
        self._set_status(run_id, "failed", error)

    @contextmanager
    def recording(self, config: dict[str, Any], exit_layers: Sequence[int], num_layers: int, **kwargs: Any):
        """``with store.recording(...) as run_id:`` finishes the run, or marks it failed on any exception."""
        run_id = self.start_run(config, exit_layers, num_layers, **kwargs)
        try:
            yield run_id
        except BaseException as err:  # KeyboardInterrupt too: the run must not look finished
            self.fail_run(run_id, f"{type(err).__name__}: {err}")
            raise
        self.finish_run(run_id)

    def _set_status(self, run_id: str, status: str, error: str | None) -> None:
        self._check_writable()
        with self._connect() as con:
            self._check_running(con, run_id)
            con.execute(
                "UPDATE runs SET status = ?, error = ?, finished = ? WHERE run_id = ?",
                [status, error, datetime.now(UTC).replace(tzinfo=None), run_id],
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} was opened read-only")

    def _check_running(self, con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        self._check_writable()
        rows = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchall()
        row = rows[0] if rows else None
        if row is None:
            raise StoreError(f"run {run_id!r} does not exist in {self.path}")
        if row[0] != "running":
            raise StoreError(f"run {run_id!r} is {row[0]}; finished and failed runs are immutable")

    # ------------------------------------------------------------------ reading
    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run read SQL against the store and return a DataFrame."""
        with self._connect() as con:
            return con.execute(sql, list(params)).df()

    def runs(self, include_failed: bool = False) -> pd.DataFrame:
        """One row per run with its headline metrics as columns, newest last."""
        where = "" if include_failed else "WHERE r.status = 'finished'"
        frame = self.query(
            f"""SELECT r.run_id, r.name, r.kind, r.status, r.created, r.requests_key, r.num_layers, r.parent_run,
                       m.name AS metric, m.value
                FROM runs r LEFT JOIN metrics m USING (run_id) {where} ORDER BY r.created"""
        )
        index = ["run_id", "name", "kind", "status", "created", "requests_key", "num_layers", "parent_run"]
        if frame.empty:
            return pd.DataFrame(columns=index)
        # pivot on run_id alone: pivot_table over several index columns would give their cross product
        runs = frame[index].drop_duplicates("run_id").set_index("run_id")
        metrics = frame.dropna(subset=["metric"]).pivot(index="run_id", columns="metric", values="value")
        wide = runs.join(metrics).reset_index()
        return wide.sort_values("created").reset_index(drop=True).rename_axis(columns=None)

    def full_depth_runs(self, requests_key: str | None = None, same_requests_only: bool = False) -> list[str]:
        """Finished live full-depth runs (every exit layer logged, so replayable), newest first.

        Runs of `requests_key` (the same requests, prompts, model and heads) come first; with
        `same_requests_only` the others are left out.
        """
        frame = self.query(
            """SELECT run_id, requests_key FROM runs
               WHERE status = 'finished' AND kind = 'live' AND json_extract_string(config, '$.policy') = ?
               ORDER BY created DESC""",
            [FULL_DEPTH],
        )
        same = frame["requests_key"] == requests_key
        others = [] if same_requests_only else list(frame.loc[~same, "run_id"])
        return list(frame.loc[same, "run_id"]) + others

    def engine_seconds(self, run_id: str) -> float | None:
        """Seconds the engine took for a live run (its ``engine`` timing), or None."""
        frame = self.query("SELECT seconds FROM timings WHERE run_id = ? AND stage = 'engine'", [run_id])
        return float(frame["seconds"].iloc[0]) if not frame.empty else None

    def run(self, run_id: str) -> dict[str, Any]:
        """A run's record with its config, versions and exit layers parsed."""
        frame = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if frame.empty:
            raise StoreError(f"run {run_id!r} does not exist in {self.path}")
        record = frame.iloc[0].to_dict()
        for key in ("config", "versions", "exit_layers"):
            record[key] = json.loads(record[key])
        return record

    def predictions(self, run_id: str) -> pd.DataFrame:
        """The run's predictions, by request id."""
        return self.query("SELECT * FROM predictions WHERE run_id = ? ORDER BY request_id", [run_id])

    def metrics(self, run_id: str) -> dict[str, float]:
        """The run's metrics as a dict."""
        frame = self.query("SELECT name, value FROM metrics WHERE run_id = ?", [run_id])
        return dict(zip(frame["name"], frame["value"], strict=True))

    def timings(self, run_id: str) -> pd.DataFrame:
        """The run's timed stages."""
        return self.query("SELECT stage, seconds, requests FROM timings WHERE run_id = ?", [run_id])

    def requests(self, run_id: str) -> pd.DataFrame:
        """Prompt and retrieved evidence (JSON) per request of a run."""
        return self.query(
            "SELECT request_id, prompt, retrieved FROM requests WHERE run_id = ? ORDER BY request_id", [run_id]
        )

    def layer_outputs(self, run_id: str, request_id: int) -> pd.DataFrame:
        """Every head output logged for one request, by layer."""
        return self.query(
            "SELECT layer, head, prob FROM layer_outputs WHERE run_id = ? AND request_id = ? ORDER BY layer",
            [run_id, int(request_id)],
        )

    def layer_matrix(self, run_id: str) -> tuple[pd.DataFrame, list[int], np.ndarray]:
        """For a finished full-depth run: (predictions, exit layers, probs ``[N, L]`` in prediction order)."""
        if run_id in self._matrices:
            return self._matrices[run_id]
        record = self.run(run_id)
        if record["status"] != "finished":
            raise StoreError(f"run {run_id!r} is {record['status']}; only finished runs can be replayed")
        layers = record["exit_layers"]
        preds = self.predictions(run_id)
        outputs = self.query(
            "SELECT request_id, layer, prob FROM layer_outputs WHERE run_id = ? ORDER BY request_id, layer", [run_id]
        )
        wide = outputs.pivot(index="request_id", columns="layer", values="prob").reindex(
            index=preds["request_id"], columns=layers
        )
        if wide.isna().any().any():
            raise StoreError(
                f"run {run_id!r} did not log every exit layer for every request; replay needs a full-depth run "
                f"(policy {FULL_DEPTH!r})"
            )
        result = (preds, layers, wide.to_numpy(dtype=np.float64))
        self._matrices[run_id] = result
        return result

    def replay(self, run_id: str, policy: ExitPolicy) -> ReplayResult:
        """Score `policy` on a logged full-depth run without the model; equals a live run of it."""
        preds, layers, probs = self.layer_matrix(run_id)
        result = replay_policy(policy, probs, layers)
        frame = pd.DataFrame(
            {
                "request_id": preds["request_id"].to_numpy(),
                "user": preds["user"].to_numpy(),
                "label": preds["label"].to_numpy(),
                "prob": result.prob,
                "exit_layer": result.layer,
            }
        )
        num_layers = self._num_layers.setdefault(run_id, int(self.run(run_id)["num_layers"]))
        metrics = summarize(frame["label"], frame["prob"], frame["user"], frame["exit_layer"], num_layers)
        return ReplayResult(predictions=frame, metrics=metrics)

    def sweep(self, run_id: str, policies: Sequence[ExitPolicy]) -> pd.DataFrame:
        """Replay many policies (e.g. a threshold grid) on one logged run: AUC, mean exit layer, savings.

        Cheap metrics only (AUC, no GAUC). Every exit prob is one of the run's logged outputs, so their
        order is ranked once per run and each setting's AUC is a counting pass over those ranks, no sort.
        """
        preds, layers, probs = self.layer_matrix(run_id)
        labels = preds["label"].to_numpy().astype(bool)
        num_layers = self._num_layers.setdefault(run_id, int(self.run(run_id)["num_layers"]))
        if run_id not in self._ranks:  # once per run, like the matrix: equal probs share a rank
            levels, inverse = np.unique(probs, return_inverse=True)
            self._ranks[run_id] = (inverse.reshape(probs.shape), len(levels))
        ranks, levels = self._ranks[run_id]
        rows = np.arange(len(probs))
        out = []
        for policy in policies:
            result = replay_policy(policy, probs, layers)
            mean_layer = float(result.layer.mean())
            out.append(
                {
                    "policy": policy,
                    "auc": auc_of_ranks(ranks[rows, result.index], labels, levels),
                    "mean_exit_layer": mean_layer,
                    "layer_savings": num_layers / mean_layer,
                }
            )
        return pd.DataFrame(out)

