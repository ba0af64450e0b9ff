"""Connecting to the store file: briefly, waiting while another process holds it, and with readable errors.

DuckDB locks a file for one writing process or for many reading processes, never both, so every store
call connects, does one short transaction and closes. A call that finds the file locked waits and retries
with jittered exponential backoff, up to a timeout. Every DuckDB error leaves as a :class:`StoreError`
naming the file and what to do.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from mhee_sdk.store.liveness import _Interrupts, holding_interrupts

LOCK_TIMEOUT_S = 60.0  # the longest a call waits for another process to release the file

# Store connections read and write the store file only: no other files (read_text, COPY, ATTACH),
# no extension install or auto-load, and nothing a query could switch back on.
SETTINGS = {
    "enable_external_access": "false",
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "lock_configuration": "true",
}
_FIX_DAMAGED = "restore it from a backup, or move it aside and record into a new store file"


class StoreError(RuntimeError):
    """The store file is unusable, or an operation is not allowed (e.g. writing a finished run)."""


class StoreBusyError(StoreError):
    """Another process holds the store: a run writing it, or a lock held past the timeout."""


@dataclass
class LockWaits:
    """How often and how long this Store waited for another process to release the file."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


@contextmanager
def connection(
    path: Path, write: bool, doing: str, timeout: float, waits: LockWaits, interrupts: _Interrupts | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection; every DuckDB error leaves as a StoreError naming the file and the fix.

    During a recorded run, Ctrl-C/SIGTERM wait until the connection is closed: DuckDB would turn an
    exception raised inside a query into ``RuntimeError: Query interrupted``, and a write must not be
    cut between its commit and the bookkeeping of what was committed.

    doing: what the caller is doing, for messages ("starting a run"; "query..." words query errors).
    """
    with holding_interrupts(interrupts):
        con = _connect(path, not write, doing, timeout, waits, interrupts)
        try:
            yield con
        except duckdb.Error as err:
            raise store_error(err, path, doing) from err
        finally:
            try:
                con.close()  # rolls back an uncommitted transaction; releases the file lock
            except duckdb.Error as err:
                raise store_error(err, path, doing) from err


def _connect(
    path: Path, read_only: bool, doing: str, timeout: float, waits: LockWaits, interrupts: _Interrupts | None
) -> duckdb.DuckDBPyConnection:
    """Connect, waiting with jittered exponential backoff while another process holds the file."""
    started = time.monotonic()
    delay = 0.002
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=SETTINGS)
        except duckdb.IOException as err:
            if "Could not set lock" not in str(err):
                raise store_error(err, path, doing) from err
            _wait_for_lock(err, path, doing, started, delay, timeout, interrupts)
            delay = min(delay * 2, 0.05)  # the other process holds the file for milliseconds
            continue
        except duckdb.Error as err:
            raise store_error(err, path, doing) from err
        waited = time.monotonic() - started
        if delay > 0.002:
            waits.count += 1
            waits.total_s += waited
            waits.max_s = max(waits.max_s, waited)
        return con


def _wait_for_lock(
    err: duckdb.IOException,
    path: Path,
    doing: str,
    started: float,
    delay: float,
    timeout: float,
    interrupts: _Interrupts | None,
) -> None:
    waited = time.monotonic() - started
    if waited >= timeout:
        holder = re.search(r"held in (.*?) \(PID (\d+)\)", str(err))
        who = f"process {holder[2]} ({holder[1]})" if holder else "another process"
        raise StoreBusyError(
            f"{path} stayed locked by {who} for {waited:.0f} s while {doing}; a query that long, or a "
            "program holding a DuckDB connection open, blocks the store: close it (notebooks: "
            "Store.open(path, read_only=True), whose calls hold the file for milliseconds), or raise "
            "Store.open(..., timeout=)"
        ) from err
    if interrupts is not None and interrupts.state == "holding" and interrupts.deferred:
        interrupts.arm()  # nothing is written yet: let a held Ctrl-C/SIGTERM stop the wait
    time.sleep(min(delay, timeout - waited) * random.uniform(0.5, 1.5))


def store_error(err: duckdb.Error, path: Path, doing: str) -> StoreError:
    """The StoreError to raise for a DuckDB error met while `doing`: what went wrong with `path`, and the fix."""
    text = str(err).split("\n")[0]
    low = text.lower()
    if "no space left" in low or "disk full" in low or "disk quota" in low:
        return StoreError(
            f"the disk holding {path} is full ({text}) while {doing}; free space there and "
            "run again (a run cut short by this is marked failed, or abandoned until "
            "Store.repair())"
        )
    if isinstance(err, duckdb.PermissionException):
        return StoreError(f"{path}: store connections may not touch other files or extensions ({text})")
    if "read-only" in low:
        return StoreError(f"{path} is opened read-only here ({text}); it changes only through Store methods")
    if isinstance(err, duckdb.IOException | duckdb.SerializationException | duckdb.InternalException):
        return StoreError(f"{path} is not a readable DuckDB file or is damaged ({text}); {_FIX_DAMAGED}")
    if doing.startswith("query"):
        return StoreError(f"query on {path} failed: {text}")
    if isinstance(err, duckdb.CatalogException | duckdb.BinderException):
        return StoreError(f"{path} does not match the mhee store schema ({text}); {_FIX_DAMAGED}")
    return StoreError(f"DuckDB failed on {path} while {doing}: {text}")
