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

The modules, in reading order: ``schema`` (the tables, migration, open-time checks), ``connection``
(short-lived connections, lock waits, error messages), ``liveness`` (pid/host/heartbeat, abandoned runs,
Ctrl-C/SIGTERM), ``writing`` (recording a run), ``core`` (:class:`Store`: open and read), ``replay``
(scoring policies on a logged full-depth run).
"""

from __future__ import annotations

from mhee_sdk.store.connection import LOCK_TIMEOUT_S, SETTINGS, LockWaits, StoreBusyError, StoreError
from mhee_sdk.store.core import Store
from mhee_sdk.store.liveness import _HOST as _HOST  # the host name runs record (tests compare with it)
from mhee_sdk.store.liveness import HEARTBEAT_LIMIT_S, Terminated, abandoned_reason
from mhee_sdk.store.replay import ReplayResult
from mhee_sdk.store.schema import DEFAULT_PATH, SCHEMA, SCHEMA_VERSION
from mhee_sdk.store.writing import FLUSH_SECONDS

__all__ = [
    "DEFAULT_PATH",
    "FLUSH_SECONDS",
    "HEARTBEAT_LIMIT_S",
    "LOCK_TIMEOUT_S",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SETTINGS",
    "LockWaits",
    "ReplayResult",
    "Store",
    "StoreBusyError",
    "StoreError",
    "Terminated",
    "abandoned_reason",
]
