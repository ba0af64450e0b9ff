"""Is a run's process still there? Abandoned runs, and Ctrl-C/SIGTERM while a run records.

Every run records its process (pid, host) and a heartbeat, renewed with each committed batch. A
``running`` run whose process died without a word (SIGKILL, power loss) shows as ``abandoned``: on its own
host the process table decides, elsewhere a heartbeat older than ``HEARTBEAT_LIMIT_S``. Abandoned runs are
never counted; :meth:`Store.repair` (or the next writer) marks them failed. A run interrupted by Ctrl-C or
SIGTERM is marked failed at once, after any write in progress is complete (:class:`_Interrupts`).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

HEARTBEAT_LIMIT_S = 600.0  # a run on another host with no heartbeat for this long is abandoned
_HOST = socket.gethostname()


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


def effective_status(frame: pd.DataFrame) -> pd.Series:
    """Each run's status as reported: ``abandoned`` for a ``running`` run whose process is gone.

    frame: rows of the runs table with status, pid, host, heartbeat and created.
    """
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


def repair_abandoned(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Inside the caller's transaction: mark failed every abandoned run; returns (run_id, reason) for each."""
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


class Terminated(SystemExit):
    """SIGTERM arrived during a recorded run; the run was marked failed, then the process exits (status 143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "SIGTERM: the process was asked to terminate"


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


@contextmanager
def holding_interrupts(interrupts: _Interrupts | None) -> Iterator[None]:
    """Around one write inside a recorded run: an interrupt waits until the write is complete, then raises."""
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
