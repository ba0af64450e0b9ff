"""The :class:`Store`: open a store file and read runs back; recording them is in :mod:`.writing`.

Reads go through :meth:`Store.query`, one read-only SELECT on a short-lived connection (see
:mod:`.connection`). Finished runs are immutable, so what is read from them is cached on the Store.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pandas as pd

from mhee_sdk.exits.policies import FULL_DEPTH
from mhee_sdk.interfaces import ExitPolicy
from mhee_sdk.store import schema
from mhee_sdk.store.connection import LOCK_TIMEOUT_S, LockWaits, StoreError, connection
from mhee_sdk.store.liveness import _Interrupts, abandoned_reason, effective_status, repair_abandoned
from mhee_sdk.store.replay import ReplayResult, dense_ranks, grid, replay_matrix, replayable, sweep_matrix
from mhee_sdk.store.schema import DEFAULT_PATH, SCHEMA_VERSION
from mhee_sdk.store.writing import FLUSH_SECONDS, _Queued, _Writing

if TYPE_CHECKING:
    from mhee_sdk.registry import Registry


class Store(_Writing):
    """A DuckDB evaluation store at `path`. Use :meth:`open`."""

    def __init__(
        self,
        path: str | Path,
        read_only: bool,
        timeout: float = LOCK_TIMEOUT_S,
        flush_seconds: float = FLUSH_SECONDS,
        registry: Registry | None = None,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.timeout = timeout
        self.flush_seconds = flush_seconds
        self.lock_waits = LockWaits()
        self.schema_version = SCHEMA_VERSION
        self.registry = registry  # where replay and sweep look policy names up; None: the process-wide one
        self._queued: dict[str, _Queued] = {}
        self._last_flush: dict[str, float] = {}
        self._interrupts: _Interrupts | None = None
        # finished runs are immutable, so what is read from them can be cached
        self._matrices: dict[str, tuple] = {}
        self._ranks: dict[str, tuple[np.ndarray, int]] = {}  # per run: dense ranks of the matrix, level count
        self._num_layers: dict[str, int] = {}

    @classmethod
    def open(
        cls,
        path: str | Path = DEFAULT_PATH,
        read_only: bool = False,
        timeout: float = LOCK_TIMEOUT_S,
        flush_seconds: float = FLUSH_SECONDS,
        registry: Registry | None = None,
    ) -> Store:
        """Open (creating a new file when writable), check it is an mhee store, migrate it, repair dead runs.

        timeout: seconds to wait for another process to release the file; flush_seconds: how often a
        writer commits queued batches (0: every batch); registry: where :meth:`replay` and :meth:`sweep` look
        policy names up (default: ``mhee_sdk.registry.get_registry()``, loaded when a name is first used).
        """
        store = cls(path, read_only, timeout, flush_seconds, registry)
        schema.check_location(store.path, read_only)
        if not read_only and store.path.is_file() and store.path.stat().st_size == 0:
            store.path.unlink()  # an empty file (e.g. from mktemp) is a new store; DuckDB refuses to open it
        with store._connection(write=not read_only, doing="opening") as con:
            found = schema.inspect(con, store.path, read_only)
            if not read_only:
                con.begin()
                schema.create_or_migrate(con, found)
                repair_abandoned(con)  # open-time cleanup: runs whose process died are marked failed
                con.commit()
                found = SCHEMA_VERSION
        store.schema_version = found
        return store

    def _connection(self, write: bool, doing: str) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        return connection(self.path, write, doing, self.timeout, self.lock_waits, self._interrupts)

    # ------------------------------------------------------------------ reading
    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run one read-only SELECT against the store and return a DataFrame."""
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as err:
            raise StoreError(f"query on {self.path} failed: {str(err).splitlines()[0]}") from err
        kinds = [s.type.name for s in statements]
        if kinds != ["SELECT"]:
            raise StoreError(
                f"Store.query runs one SELECT statement; got {', '.join(kinds) or 'none'} "
                "(the store changes only through its own methods)"
            )
        if self._queued:
            self.flush()  # read your own writes
        with self._connection(write=False, doing="query") as con:
            return con.execute(sql, list(params)).df()

    def _run_columns(self) -> str:
        # a version-1 file opened read-only has no process columns; it still reads
        if self.schema_version >= 2:
            return "pid, host, heartbeat"
        return "NULL::INTEGER AS pid, NULL::VARCHAR AS host, NULL::TIMESTAMP AS heartbeat"

    def runs(self, include_failed: bool = False) -> pd.DataFrame:
        """One row per run with its headline metrics as columns, oldest first.

        Only finished runs unless include_failed; then ``status`` also shows ``abandoned`` runs.
        """
        where = "" if include_failed else "WHERE r.status = 'finished'"
        frame = self.query(
            f"""SELECT r.run_id, r.name, r.kind, r.status, r.created, r.requests_key, r.num_layers, r.parent_run,
                       {self._run_columns()}, m.name AS metric, m.value
                FROM runs r LEFT JOIN metrics m USING (run_id) {where} ORDER BY r.created"""
        )
        index = ["run_id", "name", "kind", "status", "created", "requests_key", "num_layers", "parent_run"]
        if frame.empty:
            return pd.DataFrame(columns=index)
        frame["status"] = effective_status(frame)
        # pivot on run_id alone: pivot_table over several index columns would give their cross product
        runs = frame[index].drop_duplicates("run_id").set_index("run_id")
        metrics = frame.dropna(subset=["metric"]).pivot(index="run_id", columns="metric", values="value")
        wide = runs.join(metrics).reset_index()
        return wide.sort_values("created").reset_index(drop=True).rename_axis(columns=None)

    def status_counts(self) -> dict[str, int]:
        """How many runs are finished, running, abandoned and failed."""
        frame = self.query(f"SELECT status, created, {self._run_columns()} FROM runs")
        counts = Counter(effective_status(frame)) if not frame.empty else Counter()
        return {status: counts.get(status, 0) for status in ("finished", "running", "abandoned", "failed")}

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
        """A run's record, config, versions and exit layers parsed; status ``abandoned`` once its process is gone."""
        extra = "" if self.schema_version >= 2 else f", {self._run_columns()}"
        frame = self.query(f"SELECT *{extra} FROM runs WHERE run_id = ?", [run_id])
        if frame.empty:
            raise StoreError(f"run {run_id!r} does not exist in {self.path}")
        record = frame.iloc[0].to_dict()
        if record["status"] == "running":
            reason = abandoned_reason(record["pid"], record["host"], record["heartbeat"], record["created"])
            if reason is not None:
                record["status"], record["error"] = "abandoned", reason
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

    # ------------------------------------------------------------------ replaying policies
    def replay(self, run_id: str, policy: str | ExitPolicy, **params: Any) -> ReplayResult:
        """Score `policy` on a logged full-depth run without the model; equals a live run of it.

        policy: a registered name with its parameters, ``replay(run_id, "max-prob", threshold=0.7)``, or an
        object, ``replay(run_id, MaxProb(0.7))``. A policy that calibrates must come calibrated (an object, or
        its calibrated parameters such as ``thresholds=``): the store holds no validation outputs.
        """
        policy = self._policy(policy, params)
        preds, layers, probs = self.layer_matrix(run_id)
        num_layers = self._num_layers.setdefault(run_id, int(self.run(run_id)["num_layers"]))
        return replay_matrix(policy, preds, layers, probs, num_layers)

    def sweep(self, run_id: str, policies: str | Sequence[ExitPolicy | str], **params: Any) -> pd.DataFrame:
        """Replay many policies (e.g. a threshold grid) on one logged run: AUC, mean exit layer, savings.

        policies: a registered name whose parameter given as a list is the grid, the others fixed, e.g.
        ``sweep(run_id, "max-prob", threshold=[0.6, 0.7, 0.8])`` (the table gets a column for it), or a list
        of policies, e.g. ``[MaxProb(0.6), MultiHead(ratio=2.0)]``.

        Cheap metrics only (AUC, no GAUC). Every exit prob is one of the run's logged outputs, so their
        order is ranked once per run and each setting's AUC is a counting pass over those ranks, no sort.
        """
        varying, settings = None, []
        if isinstance(policies, str):
            varying, settings = grid(params)
            policies = [self._policy(policies, setting) for setting in settings]
        elif params:
            raise ValueError(f"parameters {sorted(params)} go with a policy name, not a list of policies")
        else:
            policies = [self._policy(policy, {}) for policy in policies]  # all checked before any is replayed
        preds, layers, probs = self.layer_matrix(run_id)
        labels = preds["label"].to_numpy().astype(bool)
        num_layers = self._num_layers.setdefault(run_id, int(self.run(run_id)["num_layers"]))
        if run_id not in self._ranks:  # once per run, like the matrix: equal probs share a rank
            self._ranks[run_id] = dense_ranks(probs)
        table = sweep_matrix(policies, labels, layers, probs, self._ranks[run_id], num_layers)
        if varying is not None:
            table.insert(1, varying, [setting[varying] for setting in settings])
        return table

    def _policy(self, policy: str | ExitPolicy, params: Mapping[str, Any]) -> ExitPolicy:
        """A policy to replay: built by registered name from `params`, or an object used as is."""
        if isinstance(policy, str):
            if self.registry is None:
                from mhee_sdk.registry import get_registry  # here, so importing the store loads no plugins

                self.registry = get_registry()
            policy = self.registry.create("exit_policy", policy, **params)  # an unknown name says "did you mean"
        elif params:
            raise ValueError(f"parameters {sorted(params)} go with a policy name, not an object ({policy!r})")
        return replayable(policy)
