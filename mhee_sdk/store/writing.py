"""Recording a run: one writing run at a time, rows committed in whole batches, interruptions marked failed.

``start_run`` refuses while another process's run is writing (checked and inserted under one lock). A
writer queues each batch's rows in memory and commits them at most every ``flush_seconds``, all tables of a
batch in one transaction with the run's heartbeat: readers see whole batches and the file is locked for
milliseconds a second. Every write first checks that the run is still ``running``, so finished and failed
runs are immutable. :meth:`recording` marks a run failed on any exception, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from mhee_sdk.store.connection import StoreBusyError, StoreError
from mhee_sdk.store.liveness import _HOST, _Interrupts, _now, repair_abandoned
from mhee_sdk.store.schema import _COLUMNS

FLUSH_SECONDS = 1.0  # a writer commits queued batches at most this often
_MAX_QUEUED_ROWS = 200_000  # commit earlier than flush_seconds when this many rows wait


@dataclass
class _Queued:
    """Rows of whole batches waiting to be committed for one run."""

    frames: dict[str, list[pd.DataFrame]] = field(default_factory=dict)
    rows: int = 0


def _versions() -> dict[str, str]:
    names = ["mhee-sdk", "torch", "transformers", "duckdb", "scikit-learn"]
    return {name: package_version(name) for name in names}


class _Writing:
    """The :class:`Store` methods that record runs; the Store holds the state they use (below)."""

    path: Path
    read_only: bool
    flush_seconds: float
    _queued: dict[str, _Queued]
    _last_flush: dict[str, float]
    _interrupts: _Interrupts | None
    _connection: Callable[..., AbstractContextManager[duckdb.DuckDBPyConnection]]

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
        """Create a ``running`` run; returns its id. Refused while another process's run is writing."""
        self._check_writable()
        run_id = uuid.uuid4().hex[:12]
        with self._connection(write=True, doing="starting a run") as con:
            con.begin()  # check and insert under one lock: two processes cannot both pass the check
            repair_abandoned(con)
            others = con.execute(
                "SELECT run_id, name, pid, host, heartbeat FROM runs WHERE status = 'running' AND "
                "NOT (pid IS NOT DISTINCT FROM ? AND host IS NOT DISTINCT FROM ?)",
                [os.getpid(), _HOST],
            ).fetchall()
            if others:
                other, label, pid, host, beat = others[0]
                who = "a schema-1 writer" if pid is None else f"process {pid} on {host}"
                beat = "none" if beat is None else f"{beat:%Y-%m-%d %H:%M:%S} UTC"
                raise StoreBusyError(
                    f"{self.path} is being written by run {other} ({label!r}) of {who} (last heartbeat {beat}); "
                    "one writing run at a time: wait for it to finish, stop it, or record into another store file"
                )
            now = _now()
            con.execute(
                "INSERT INTO runs (run_id, name, kind, status, created, config, versions, exit_layers, num_layers, "
                "requests_key, parent_run, pid, host, heartbeat) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?)",
                [
                    run_id,
                    name,
                    kind,
                    now,
                    json.dumps(config, sort_keys=True),
                    json.dumps(_versions()),
                    json.dumps([int(x) for x in exit_layers]),
                    int(num_layers),
                    requests_key,
                    parent_run,
                    os.getpid(),
                    _HOST,
                    now,
                ],
            )
            con.commit()
        self._last_flush[run_id] = time.monotonic()
        return run_id

    def append_batch(self, run_id: str, tables: Mapping[str, pd.DataFrame]) -> None:
        """Queue one batch's rows, ``{table: DataFrame}``; a batch reaches the file whole, in one transaction.

        Queued batches are committed at most every ``flush_seconds`` (and by every other write of the run,
        e.g. ``finish_run``), together with the run's heartbeat.
        """
        self._check_writable()
        rows = {table: self._rows(table, frame) for table, frame in tables.items()}  # all checked before any is queued
        queued = self._queued.setdefault(run_id, _Queued())
        for table, frame in rows.items():
            queued.frames.setdefault(table, []).append(frame)
            queued.rows += len(frame)
        due = time.monotonic() - self._last_flush.get(run_id, 0.0) >= self.flush_seconds
        if due or queued.rows >= _MAX_QUEUED_ROWS:
            self.flush(run_id)

    def append(self, run_id: str, table: str, frame: pd.DataFrame) -> None:
        """Queue rows (a DataFrame with the table's columns) of a running run; see :meth:`append_batch`."""
        self.append_batch(run_id, {table: frame})

    def flush(self, run_id: str | None = None) -> None:
        """Commit the queued batches of one run (default: of every run) now."""
        for run in [run_id] if run_id is not None else list(self._queued):
            self._write(run, "writing a batch", lambda con: None)

    def heartbeat(self, run_id: str) -> None:
        """Commit queued batches and record that the run's process is alive (for long stages without batches)."""
        self.flush(run_id)

    def add_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Record named metric values for a running run."""
        frame = pd.DataFrame({"run_id": run_id, "name": list(metrics), "value": [float(v) for v in metrics.values()]})

        def insert(con: duckdb.DuckDBPyConnection) -> None:
            con.register("incoming", frame)
            con.execute("INSERT INTO metrics SELECT run_id, name, value FROM incoming")
            con.unregister("incoming")

        self._write(run_id, "recording metrics", insert)

    def add_timing(self, run_id: str, stage: str, seconds: float, requests: int) -> None:
        """Record wall-clock seconds spent in a stage on `requests` requests."""
        self._write(
            run_id,
            "recording a timing",
            lambda con: con.execute(
                "INSERT INTO timings VALUES (?, ?, ?, ?)", [run_id, stage, float(seconds), int(requests)]
            ),
        )

    def finish_run(self, run_id: str) -> None:
        """Commit the queued batches and mark the run finished, in one transaction; it cannot change afterwards."""
        self._set_status(run_id, "finished", None)

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark a run failed with its error; its rows stay for inspection but it is never reported."""
        if run_id in self._queued:
            try:
                self._set_status(run_id, "failed", error)
                return
            except StoreError as err:  # e.g. a full disk: the failure mark matters more than the queued rows
                dropped = self._queued.pop(run_id).rows
                error = f"{error} (and {dropped} queued rows were not written: {err})"
        self._set_status(run_id, "failed", error)

    @contextmanager
    def recording(
        self, config: dict[str, Any], exit_layers: Sequence[int], num_layers: int, **kwargs: Any
    ) -> Iterator[str]:
        """``with store.recording(...) as run_id:`` finishes the run, or marks it failed on any exception,
        Ctrl-C or SIGTERM (raised as :class:`Terminated`) included; a second interrupt waits for the marking.
        """
        if self._interrupts is not None:  # nested: the outer recording handles the signals
            yield from self._record(config, exit_layers, num_layers, kwargs)
            return
        with _Interrupts() as interrupts:
            self._interrupts = interrupts
            try:
                yield from self._record(config, exit_layers, num_layers, kwargs)
            finally:
                self._interrupts = None

    def _record(self, config, exit_layers, num_layers, kwargs) -> Iterator[str]:
        interrupts = self._interrupts
        run_id = self.start_run(config, exit_layers, num_layers, **kwargs)
        try:
            interrupts.arm()
            yield run_id
        except BaseException as err:  # KeyboardInterrupt and Terminated too: the run must not look finished
            interrupts.state = "closing"
            try:
                self.fail_run(run_id, f"{type(err).__name__}: {err}")
            except StoreError as mark:
                err.add_note(
                    f"marking run {run_id} failed in {self.path} failed too ({mark}); it shows as "
                    "abandoned once this process exits, and Store.repair() marks it failed"
                )
            raise
        interrupts.state = "closing"
        self.finish_run(run_id)

    def repair(self) -> list[tuple[str, str]]:
        """Mark failed every ``running`` run whose process is gone; returns (run_id, reason) for each."""
        self._check_writable()
        with self._connection(write=True, doing="repairing") as con:
            con.begin()
            repaired = repair_abandoned(con)
            con.commit()
        return repaired

    def _set_status(self, run_id: str, status: str, error: str | None) -> None:
        self._write(
            run_id,
            f"marking run {run_id} {status}",
            lambda con: con.execute(
                "UPDATE runs SET status = ?, error = ?, finished = ? WHERE run_id = ?", [status, error, _now(), run_id]
            ),
        )
        self._last_flush.pop(run_id, None)

    def _write(self, run_id: str, doing: str, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> None:
        """One transaction: check the run is running, commit its queued batches and heartbeat, then `work`."""
        self._check_writable()
        with self._connection(write=True, doing=doing) as con:
            con.begin()
            self._check_running(con, run_id)
            queued = self._queued.get(run_id)
            for table, frames in (queued.frames if queued else {}).items():
                columns = ", ".join(f'"{c}"' for c in _COLUMNS[table])
                con.register("incoming", pd.concat(frames, ignore_index=True)[_COLUMNS[table]])
                con.execute(f"INSERT INTO {table} (run_id, {columns}) SELECT ?, {columns} FROM incoming", [run_id])
                con.unregister("incoming")
            con.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", [_now(), run_id])
            work(con)
            con.commit()
            self._queued.pop(run_id, None)  # interrupts are held, so committed rows cannot stay queued
            self._last_flush[run_id] = time.monotonic()

    def _rows(self, table: str, frame: pd.DataFrame) -> pd.DataFrame:
        if table not in _COLUMNS:
            raise ValueError(f"table {table!r} is not appendable; choose from: {', '.join(_COLUMNS)}")
        missing = [c for c in _COLUMNS[table] if c not in frame.columns]
        if missing:
            raise ValueError(f"{table} rows lack columns {missing}")
        return frame.copy(deep=False)  # copy-on-write: later changes to the caller's frame do not reach the queue

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} was opened read-only")

    def _check_running(self, con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        rows = con.execute("SELECT status, error FROM runs WHERE run_id = ?", [run_id]).fetchall()
        if not rows:
            raise StoreError(f"run {run_id!r} does not exist in {self.path}")
        if rows[0][0] != "running":
            why = f" ({rows[0][1]})" if rows[0][1] else ""
            raise StoreError(f"run {run_id!r} is {rows[0][0]}{why}; finished and failed runs are immutable")
