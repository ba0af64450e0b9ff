"""The evaluation store: one DuckDB file of runs, predictions, per-layer head outputs, metrics and timings.

DuckDB locks a file for one writing process or for many reading processes, never both. So the store
never holds the file open: every call connects, does one short transaction and closes, and a call that
finds the file locked by another process waits and retries with backoff (bounded by ``timeout``). A
writer queues each batch's rows in memory and commits them at most every ``flush_seconds``, all tables
of a batch in one transaction: the file is locked for milliseconds a second, readers see whole batches,
and a reader polling the file cannot make a run fail. Between runs of different processes it is one
writer at a time: a second process's ``start_run`` is refused, naming the run that is writing.

A run is ``running`` until finished; one interrupted (an exception, Ctrl-C, SIGTERM) is marked
``failed`` with its error; one whose process died without a word (SIGKILL, power loss) shows as
``abandoned`` and is marked failed by :meth:`Store.repair` or the next writer. Only finished runs are
counted, and they are immutable. See docs/store.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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

SCHEMA_VERSION = 2  # 2: runs.pid, runs.host, runs.heartbeat
DEFAULT_PATH = "mhee_runs.duckdb"
LOCK_TIMEOUT_S = 60.0  # the longest a call waits for another process to release the file
FLUSH_SECONDS = 1.0  # a writer commits queued batches at most this often
HEARTBEAT_LIMIT_S = 600.0  # a run on another host with no heartbeat for this long is abandoned
_MAX_QUEUED_ROWS = 200_000  # commit earlier than flush_seconds when this many rows wait

# Store connections read and write the store file only: no other files (read_text, COPY, ATTACH),
# no extension install or auto-load, and nothing a query could switch back on.
SETTINGS = {
    "enable_external_access": "false",
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "lock_configuration": "true",
}

SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, status VARCHAR, created TIMESTAMP,
    finished TIMESTAMP, config VARCHAR, versions VARCHAR, exit_layers VARCHAR, num_layers INTEGER,
    requests_key VARCHAR, parent_run VARCHAR, error VARCHAR, pid INTEGER, host VARCHAR, heartbeat TIMESTAMP);
CREATE TABLE predictions (
    run_id VARCHAR, request_id BIGINT, "user" BIGINT, item BIGINT, label INTEGER, prob DOUBLE,
    exit_layer INTEGER, latency_s DOUBLE);
CREATE TABLE layer_outputs (run_id VARCHAR, request_id BIGINT, layer INTEGER, head VARCHAR, prob DOUBLE);
CREATE TABLE requests (run_id VARCHAR, request_id BIGINT, prompt VARCHAR, retrieved VARCHAR);
CREATE TABLE metrics (run_id VARCHAR, name VARCHAR, value DOUBLE);
CREATE TABLE timings (run_id VARCHAR, stage VARCHAR, seconds DOUBLE, requests INTEGER);
"""

_RUN_PROCESS = ["pid", "host", "heartbeat"]  # added by schema 2
_TABLES = {
    "schema_version": ["version"],
    "runs": [
        "run_id",
        "name",
        "kind",
        "status",
        "created",
        "finished",
        "config",
        "versions",
        "exit_layers",
        "num_layers",
        "requests_key",
        "parent_run",
        "error",
    ],
    "predictions": ["run_id", "request_id", "user", "item", "label", "prob", "exit_layer", "latency_s"],
    "layer_outputs": ["run_id", "request_id", "layer", "head", "prob"],
    "requests": ["run_id", "request_id", "prompt", "retrieved"],
    "metrics": ["run_id", "name", "value"],
    "timings": ["run_id", "stage", "seconds", "requests"],
}
_COLUMNS = {table: _TABLES[table][1:] for table in ("predictions", "layer_outputs", "requests")}
_MIGRATE_1_TO_2 = """
ALTER TABLE runs ADD COLUMN pid INTEGER;
ALTER TABLE runs ADD COLUMN host VARCHAR;
ALTER TABLE runs ADD COLUMN heartbeat TIMESTAMP;
UPDATE schema_version SET version = 2;
"""
_HOST = socket.gethostname()
_FIX_DAMAGED = "restore it from a backup, or move it aside and record into a new store file"


class StoreError(RuntimeError):
    """The store file is unusable, or an operation is not allowed (e.g. writing a finished run)."""


class StoreBusyError(StoreError):
    """Another process holds the store: a run writing it, or a lock held past the timeout."""


class Terminated(SystemExit):
    """SIGTERM arrived during a recorded run; the run was marked failed, then the process exits (status 143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "SIGTERM: the process was asked to terminate"


@dataclass(frozen=True)
class ReplayResult:
    """A policy replayed over a logged full-depth run: per-request exits and the run's metrics."""

    predictions: pd.DataFrame  # request_id, user, label, prob, exit_layer
    metrics: dict[str, float]


@dataclass
class LockWaits:
    """How often and how long this Store waited for another process to release the file."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


@dataclass
class _Queued:
    """Rows of whole batches waiting to be committed for one run."""

    frames: dict[str, list[pd.DataFrame]] = field(default_factory=dict)
    rows: int = 0


def _versions() -> dict[str, str]:
    names = ["mhee-sdk", "torch", "transformers", "duckdb", "scikit-learn"]
    return {name: package_version(name) for name in names}


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():  # Linux: a killed child not yet reaped by its parent is a zombie, i.e. gone
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    return True


def abandoned_reason(pid: Any, host: Any, heartbeat: Any, created: Any, now: datetime | None = None) -> str | None:
    """Why a ``running`` run's process is gone, or None while it may still be writing.

    On this host the process table decides; elsewhere a heartbeat older than HEARTBEAT_LIMIT_S does.
    """
    if not pd.isna(pid) and host == _HOST:
        return None if _process_alive(int(pid)) else f"its process {int(pid)} on {host} is gone"
    last = created if pd.isna(heartbeat) else heartbeat
    age = ((now or _now()) - pd.Timestamp(last).to_pydatetime()).total_seconds()
    if age <= HEARTBEAT_LIMIT_S:
        return None
    who = "a schema-1 writer (no pid recorded)" if pd.isna(pid) else f"process {int(pid)} on {host}"
    return f"no heartbeat from {who} for {age:.0f} s (limit {HEARTBEAT_LIMIT_S:g} s)"


class _Interrupts:
    """SIGINT/SIGTERM while a run records: the first one raises in the run's code; any that arrive while the
    store is writing (a batch, the run's start, end or failure) wait until that write is complete.

    Installed only in the main thread and only over the default handlers: an application's own handler
    owns its shutdown. ``state``: armed (the run's code is running), holding (a write inside the run: the
    interrupt waits, but a wait for the file lock is abandoned), closing (start/finish/fail being written).
    """

    def __init__(self) -> None:
        self.state = "closing"
        self.deferred: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self._previous[signum] = default
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if kind is None and self.deferred:
            signal.raise_signal(self.deferred[0])  # the run is written; now act on the interrupt it held back

    def _handle(self, signum: int, frame: Any) -> None:
        if self.state != "armed":
            self.deferred.append(signum)
            return
        self.state = "closing"  # a second interrupt must not cut the failure marking short
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def arm(self) -> None:
        """Let interrupts raise again, first raising one that arrived while they were held."""
        self.state = "armed"
        if self.deferred:
            self.state = "closing"
            raise Terminated() if self.deferred.pop(0) == signal.SIGTERM else KeyboardInterrupt()


class Store:
    """A DuckDB evaluation store at `path`. Use :meth:`open`."""

    def __init__(
        self, path: str | Path, read_only: bool, timeout: float = LOCK_TIMEOUT_S, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.timeout = timeout
        self.flush_seconds = flush_seconds
        self.lock_waits = LockWaits()
        self.schema_version = SCHEMA_VERSION
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
    ) -> Store:
        """Open (creating a new file when writable), check it is an mhee store, migrate it, repair dead runs.

        timeout: seconds to wait for another process to release the file; flush_seconds: how often a
        writer commits queued batches (0: every batch).
        """
        store = cls(path, read_only, timeout, flush_seconds)
        store._check_location()
        if not read_only and store.path.is_file() and store.path.stat().st_size == 0:
            store.path.unlink()  # an empty file (e.g. from mktemp) is a new store; DuckDB refuses to open it
        with store._connection(write=not read_only, doing="opening") as con:
            found = store._inspect(con)
            if not read_only:
                con.begin()
                if found is None:
                    con.execute(SCHEMA)
                    con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
                elif found < SCHEMA_VERSION:
                    con.execute(_MIGRATE_1_TO_2)
                store._repair(con)  # open-time cleanup: runs whose process died are marked failed
                con.commit()
                found = SCHEMA_VERSION
        store.schema_version = found
        return store

    # ------------------------------------------------------------------ the file
    def _check_location(self) -> None:
        folder = self.path.absolute().parent
        if not folder.is_dir():
            raise StoreError(
                f"folder {folder} does not exist; create it (mkdir -p {folder}) or choose another "
                f"store path than {self.path}"
            )
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a folder; give a file path for the store, e.g. {self.path / DEFAULT_PATH}"
            )
        if self.read_only and not self.path.is_file():
            raise StoreError(f"{self.path} does not exist; run an evaluation first (e.g. `mhee demo`)")
        if self.read_only and self.path.stat().st_size == 0:
            raise StoreError(f"{self.path} is an empty file, not an mhee store yet; record a run into it first")

    def _inspect(self, con: duckdb.DuckDBPyConnection) -> int | None:
        """The file's schema version after checking it is an intact mhee store; None for an empty database."""
        objects = con.execute(
            """SELECT table_name, table_type FROM information_schema.tables WHERE table_catalog = current_database()
               UNION ALL SELECT function_name, 'MACRO' FROM duckdb_functions()
               WHERE NOT internal AND database_name = current_database()"""
        ).fetchall()
        kinds = dict(objects)
        if not objects:
            if self.read_only:
                raise StoreError(
                    f"{self.path} is an empty DuckDB file, not an mhee store yet; record a run into it first"
                )
            return None
        if "schema_version" not in kinds:
            names = ", ".join(sorted(kinds)[:8])
            raise StoreError(
                f"{self.path} is a DuckDB database but not an mhee store (it holds {names}); "
                "use a new file for the store"
            )
        foreign = sorted(f"{kind.lower()} {name}" for name, kind in objects if kind != "BASE TABLE")
        if foreign:
            # a view or macro could read other files or disguise what the store's queries return
            raise StoreError(f"{self.path} is not a plain mhee store: it defines {', '.join(foreign)}; {_FIX_DAMAGED}")
        found = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        if found is None:
            raise StoreError(f"{self.path} has an empty schema_version table, so its format is unknown; {_FIX_DAMAGED}")
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has store schema {found}, newer than this mhee-sdk understands "
                f"({SCHEMA_VERSION}); upgrade mhee-sdk"
            )
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_catalog = current_database()"
        ).fetchall()
        have: dict[str, set[str]] = {}
        for table, column in columns:
            have.setdefault(table, set()).add(column)
        for table, expected in _TABLES.items():
            expected = expected + _RUN_PROCESS if table == "runs" and found >= 2 else expected
            if table not in have:
                raise StoreError(f"{self.path} lacks the table {table!r} of an mhee store; {_FIX_DAMAGED}")
            missing = [c for c in expected if c not in have[table]]
            if missing:
                raise StoreError(f"{self.path}: table {table!r} lacks columns {missing}; {_FIX_DAMAGED}")
        return int(found)

    @contextmanager
    def _connection(self, write: bool, doing: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; every DuckDB error leaves as a StoreError naming the file and the fix.

        During a recorded run, Ctrl-C/SIGTERM wait until the connection is closed: DuckDB would turn an
        exception raised inside a query into ``RuntimeError: Query interrupted``, and a write must not be
        cut between its commit and the bookkeeping of what was committed.
        """
        with self._holding_interrupts():
            con = self._connect(read_only=not write, doing=doing)
            try:
                yield con
            except duckdb.Error as err:
                raise self._error(err, doing) from err
            finally:
                try:
                    con.close()  # rolls back an uncommitted transaction; releases the file lock
                except duckdb.Error as err:
                    raise self._error(err, doing) from err

    def _connect(self, read_only: bool, doing: str) -> duckdb.DuckDBPyConnection:
        """Connect, waiting with jittered exponential backoff while another process holds the file."""
        started = time.monotonic()
        delay = 0.002
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=SETTINGS)
            except duckdb.IOException as err:
                if "Could not set lock" not in str(err):
                    raise self._error(err, doing) from err
                self._wait_for_lock(err, doing, started, delay)
                delay = min(delay * 2, 0.05)  # the other process holds the file for milliseconds
                continue
            except duckdb.Error as err:
                raise self._error(err, doing) from err
            waited = time.monotonic() - started
            if delay > 0.002:
                self.lock_waits.count += 1
                self.lock_waits.total_s += waited
                self.lock_waits.max_s = max(self.lock_waits.max_s, waited)
            return con

    def _wait_for_lock(self, err: duckdb.IOException, doing: str, started: float, delay: float) -> None:
        waited = time.monotonic() - started
        if waited >= self.timeout:
            holder = re.search(r"held in (.*?) \(PID (\d+)\)", str(err))
            who = f"process {holder[2]} ({holder[1]})" if holder else "another process"
            raise StoreBusyError(
                f"{self.path} stayed locked by {who} for {waited:.0f} s while {doing}; a query that long, or a "
                "program holding a DuckDB connection open, blocks the store: close it (notebooks: "
                "Store.open(path, read_only=True), whose calls hold the file for milliseconds), or raise "
                "Store.open(..., timeout=)"
            ) from err
        if self._interrupts is not None and self._interrupts.state == "holding" and self._interrupts.deferred:
            self._interrupts.arm()  # nothing is written yet: let a held Ctrl-C/SIGTERM stop the wait
        time.sleep(min(delay, self.timeout - waited) * random.uniform(0.5, 1.5))

    def _error(self, err: duckdb.Error, doing: str) -> StoreError:
        text = str(err).split("\n")[0]
        low = text.lower()
        if "no space left" in low or "disk full" in low or "disk quota" in low:
            return StoreError(
                f"the disk holding {self.path} is full ({text}) while {doing}; free space there and "
                "run again (a run cut short by this is marked failed, or abandoned until "
                "Store.repair())"
            )
        if isinstance(err, duckdb.PermissionException):
            return StoreError(f"{self.path}: store connections may not touch other files or extensions ({text})")
        if "read-only" in low:
            return StoreError(f"{self.path} is opened read-only here ({text}); it changes only through Store methods")
        if isinstance(err, duckdb.IOException | duckdb.SerializationException | duckdb.InternalException):
            return StoreError(f"{self.path} is not a readable DuckDB file or is damaged ({text}); {_FIX_DAMAGED}")
        if doing.startswith("query"):
            return StoreError(f"query on {self.path} failed: {text}")
        if isinstance(err, duckdb.CatalogException | duckdb.BinderException):
            return StoreError(f"{self.path} does not match the mhee store schema ({text}); {_FIX_DAMAGED}")
        return StoreError(f"DuckDB failed on {self.path} while {doing}: {text}")

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
        """Create a ``running`` run; returns its id. Refused while another process's run is writing."""
        self._check_writable()
        run_id = uuid.uuid4().hex[:12]
        with self._connection(write=True, doing="starting a run") as con:
            con.begin()  # check and insert under one lock: two processes cannot both pass the check
            self._repair(con)
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
            repaired = self._repair(con)
            con.commit()
        return repaired

    def _repair(self, con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
        rows = con.execute("SELECT run_id, pid, host, heartbeat, created FROM runs WHERE status = 'running'").fetchall()
        now, repaired = _now(), []
        for run_id, pid, host, beat, created in rows:
            reason = abandoned_reason(pid, host, beat, created, now)
            if reason is not None:
                con.execute(
                    "UPDATE runs SET status = 'failed', error = ?, finished = ? WHERE run_id = ?",
                    [f"abandoned: {reason}", now, run_id],
                )
                repaired.append((run_id, reason))
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

    @contextmanager
    def _holding_interrupts(self) -> Iterator[None]:
        interrupts = self._interrupts
        if interrupts is None or interrupts.state != "armed":
            yield
            return
        interrupts.state = "holding"
        try:
            yield
        except BaseException:
            if interrupts.state == "holding":  # not an interrupt raised while waiting: stay interruptible
                interrupts.state = "armed"
            raise
        interrupts.arm()  # raises an interrupt that arrived during the write, now that it is complete

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

    @staticmethod
    def _effective_status(frame: pd.DataFrame) -> pd.Series:
        now = _now()
        return pd.Series(
            [
                "abandoned" if s == "running" and abandoned_reason(p, h, b, c, now) else s
                for s, p, h, b, c in zip(
                    frame["status"], frame["pid"], frame["host"], frame["heartbeat"], frame["created"], strict=True
                )
            ],
            index=frame.index,
            dtype=object,
        )

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
        frame["status"] = self._effective_status(frame)
        # pivot on run_id alone: pivot_table over several index columns would give their cross product
        runs = frame[index].drop_duplicates("run_id").set_index("run_id")
        metrics = frame.dropna(subset=["metric"]).pivot(index="run_id", columns="metric", values="value")
        wide = runs.join(metrics).reset_index()
        return wide.sort_values("created").reset_index(drop=True).rename_axis(columns=None)

    def status_counts(self) -> dict[str, int]:
        """How many runs are finished, running, abandoned and failed."""
        frame = self.query(f"SELECT status, created, {self._run_columns()} FROM runs")
        counts = Counter(self._effective_status(frame)) if not frame.empty else Counter()
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
