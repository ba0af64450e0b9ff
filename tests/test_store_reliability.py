"""Store faults with real processes: readers polling during a run, two writers, signals, damaged files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from mhee_sdk.store import Store, StoreBusyError, StoreError
from mhee_sdk.testing import synthetic_batch, synthetic_full_depth_run

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [3, 6, 9]

# A writer process: one finished run, then a second run of `batches` batches (predictions, layer outputs
# and requests of `rows` requests each), printing "batch i" after each; it sleeps `pause` s per batch.
WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pandas as pd
    from mhee_sdk.store import Store
    from mhee_sdk.testing import synthetic_batch, synthetic_full_depth_run

    path, batches, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pause, flush = float(sys.argv[4]), float(sys.argv[5])
    store = Store.open(path, flush_seconds=flush)
    first = synthetic_full_depth_run(store, 40, [3, 6, 9])
    print("finished", first, flush=True)
    with store.recording({"policy": "never"}, [3, 6, 9], 9, name="second") as run_id:
        print("started", run_id, flush=True)
        for i in range(batches):
            ids = np.arange(i * rows, (i + 1) * rows)
            store.append_batch(run_id, synthetic_batch(ids))
            print("batch", i, flush=True)
            time.sleep(pause)
    print("done", store.lock_waits.count, store.lock_waits.total_s, store.lock_waits.max_s, flush=True)
    """
)

# A reader process: polls every 0.1 s until `stop_file` exists, as `mhee report` or a notebook would, and
# prints one JSON line per snapshot: per run its status and row counts, read in one statement.
READER = textwrap.dedent(
    """
    import json, os, sys, time
    from mhee_sdk.store import Store

    path, stop_file = sys.argv[1], sys.argv[2]
    errors = 0
    while not os.path.exists(stop_file):
        try:
            store = Store.open(path, read_only=True)
            store.runs(include_failed=True)
            counts = store.query(
                "SELECT r.run_id, r.status, "
                "(SELECT count(*) FROM predictions p WHERE p.run_id = r.run_id) AS predictions, "
                "(SELECT count(*) FROM requests q WHERE q.run_id = r.run_id) AS requests, "
                "(SELECT count(*) FROM layer_outputs o WHERE o.run_id = r.run_id) AS outputs FROM runs r"
            )
            print(json.dumps(counts.to_dict("records")), flush=True)
        except Exception as err:
            errors += 1
            print("ERROR", type(err).__name__, err, flush=True)
        time.sleep(0.1)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _writer(path: Path, batches: int, rows: int = 2, pause: float = 0.0, flush: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, "-c", WRITER, str(path), str(batches), str(rows), str(pause), str(flush)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split()[1]
    raise AssertionError(f"writer ended before printing {prefix!r}: {proc.stderr.read()[-3000:]}")


def _batch(ids: np.ndarray) -> dict[str, pd.DataFrame]:
    return synthetic_batch(ids, LAYERS)


# ---------------------------------------------------------------------------------------- readers and writers
def test_a_polling_reader_never_fails_the_writer_and_sees_whole_batches(tmp_path):
    path, stop = tmp_path / "runs.duckdb", tmp_path / "stop"
    Store.open(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        first = reader.stdout.readline()  # the reader is polling before the run starts
        # commit at most every 0.1 s (default 1 s) and compute 10 ms per batch: much lock traffic
        store = Store.open(path, flush_seconds=0.1)
        started = time.perf_counter()
        with store.recording({"policy": "never"}, LAYERS, 9, name="polled") as run_id:
            for i in range(300):
                time.sleep(0.01)
                store.append_batch(run_id, _batch(np.arange(2 * i, 2 * i + 2)))
        seconds = time.perf_counter() - started
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
        out = first + out
    assert store.run(run_id)["status"] == "finished"
    assert len(store.predictions(run_id)) == 600 and len(store.requests(run_id)) == 600
    snapshots = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert "ERROR" not in out, out[-2000:]
    assert len(snapshots) >= 5, (out[-2000:], err[-2000:])
    seen = [row for snapshot in snapshots for row in snapshot if row["run_id"] == run_id]
    assert seen, "the reader never saw the run"
    for row in seen:  # whole batches only: each table holds the same requests
        assert row["predictions"] == row["requests"] and row["outputs"] == 3 * row["predictions"]
        assert row["predictions"] % 2 == 0
    assert max(row["predictions"] for row in seen) > 0
    print(
        f"writer: 300 batches in {seconds:.1f} s, waited {store.lock_waits.count} times, "
        f"worst {store.lock_waits.max_s * 1000:.0f} ms; reader: {len(snapshots)} snapshots"
    )


def test_batches_are_committed_together_at_most_every_flush_seconds(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb", flush_seconds=3600)
    reader = Store.open(tmp_path / "runs.duckdb", read_only=True)
    run_id = store.start_run({}, LAYERS, 9)
    store.append_batch(run_id, _batch(np.arange(4)))
    assert len(reader.predictions(run_id)) == 0  # queued, not yet written
    assert len(store.predictions(run_id)) == 4  # the writer reads its own writes
    store.append_batch(run_id, _batch(np.arange(4, 8)))
    store.finish_run(run_id)
    assert len(reader.predictions(run_id)) == 8 and len(reader.requests(run_id)) == 8


def test_a_bad_table_in_a_batch_queues_nothing(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    run_id = store.start_run({}, LAYERS, 9)
    batch = _batch(np.arange(3))
    batch["requests"] = batch["requests"].drop(columns="prompt")
    with pytest.raises(ValueError, match=r"requests rows lack columns \['prompt'\]"):
        store.append_batch(run_id, batch)
    store.finish_run(run_id)
    assert store.predictions(run_id).empty


def test_one_writing_run_at_a_time(tmp_path):
    path = tmp_path / "runs.duckdb"
    writer = _writer(path, batches=1000, pause=0.02)
    try:
        other = _wait_for(writer, "started")
        store = Store.open(path)  # opening, reading and repairing stay possible
        with pytest.raises(
            StoreBusyError,
            match=rf"being written by run {other} \('second'\) of process "
            rf"{writer.pid} on .*one writing run at a time",
        ):
            store.start_run({}, LAYERS, 9)
        assert store.status_counts()["running"] == 1
    finally:
        writer.terminate()
        writer.communicate(timeout=60)
    run_id = store.start_run({}, LAYERS, 9)  # the first writer is gone: its run was marked failed
    assert store.run(other)["status"] == "failed"
    store.finish_run(run_id)


# ---------------------------------------------------------------------------------------- no run left running
def _kill_during_run(path: Path, how: str) -> tuple[str, str, int]:
    writer = _writer(path, batches=100_000, pause=0.005, flush=0.05)
    finished = _wait_for(writer, "finished")
    running = _wait_for(writer, "started")
    for _ in range(20):  # some batches written
        writer.stdout.readline()
    if how == "double SIGINT":
        writer.send_signal(signal.SIGINT)
        time.sleep(0.02)
        writer.send_signal(signal.SIGINT)
    else:
        writer.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    writer.communicate(timeout=60)
    return finished, running, writer.returncode


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "double SIGINT"])
def test_an_interrupted_writer_leaves_no_run_running(tmp_path, how):
    path = tmp_path / "runs.duckdb"
    finished, running, code = _kill_during_run(path, how)
    reader = Store.open(path, read_only=True)
    status = reader.run(running)["status"]
    if how == "SIGKILL":
        assert code == -signal.SIGKILL and status == "abandoned"
        assert reader.status_counts() == {"finished": 1, "running": 0, "abandoned": 1, "failed": 0}
        assert reader.runs(include_failed=True).set_index("run_id")["status"][running] == "abandoned"
        assert reader.runs()["run_id"].tolist() == [finished]  # never counted
        repaired = Store.open(path, read_only=False).run(running)  # open-time cleanup by a writer
        assert repaired["status"] == "failed" and repaired["error"].startswith("abandoned: its process")
    else:
        assert status == "failed"
        error = reader.run(running)["error"]
        assert error.startswith("Terminated: SIGTERM" if how == "SIGTERM" else "KeyboardInterrupt")
        assert code == (143 if how == "SIGTERM" else -signal.SIGINT)  # KeyboardInterrupt exits as by SIGINT
    store = Store.open(path)
    assert store.repair() == []
    assert store.status_counts()["running"] == 0 and store.status_counts()["abandoned"] == 0
    assert len(store.predictions(finished)) == 40 and store.run(finished)["status"] == "finished"
    rows = store.query(
        "SELECT (SELECT count(*) FROM predictions WHERE run_id = ?) AS p, (SELECT count(*) FROM requests WHERE "
        "run_id = ?) AS q",
        [running, running],
    ).iloc[0]
    assert rows["p"] == rows["q"]  # the failed run's rows are whole batches too


def test_abandoned_runs_by_pid_and_by_heartbeat(tmp_path, monkeypatch):
    import mhee_sdk.store as store_module

    path = tmp_path / "runs.duckdb"
    store = Store.open(path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = {
        "dead pid": (gone.pid, store_module._HOST, 0),
        "alive": (os.getpid(), "elsewhere", 5),
        "silent": (1, "elsewhere", 3600),
        "mine": (os.getpid(), store_module._HOST, 3600),
    }
    ids = {label: store.start_run({}, LAYERS, 9, name=label) for label in cases}  # one process may run several
    con = duckdb.connect(str(path))
    for label, (pid, host, age) in cases.items():
        con.execute(
            "UPDATE runs SET pid = ?, host = ?, heartbeat = heartbeat - to_seconds(?) WHERE run_id = ?",
            [pid, host, age, ids[label]],
        )
    con.close()
    status = store.runs(include_failed=True).set_index("name")["status"].to_dict()
    assert status == {"dead pid": "abandoned", "alive": "running", "silent": "abandoned", "mine": "running"}
    assert store.run(ids["silent"])["error"].startswith("no heartbeat from process 1 on elsewhere for 36")
    repaired = dict(store.repair())
    assert set(repaired) == {ids["dead pid"], ids["silent"]}
    assert store.run(ids["dead pid"])["error"] == f"abandoned: its process {gone.pid} on {store_module._HOST} is gone"


# ---------------------------------------------------------------------------------------- immutability
@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM runs",
        "UPDATE metrics SET value = 0",
        "DROP TABLE predictions",
        "INSERT INTO metrics VALUES ('x', 'auc', 1.0)",
        "ATTACH 'other.duckdb' AS other",
        "COPY runs TO 'runs.csv'",
        "SET enable_external_access = true",
        "SELECT 1; DELETE FROM runs",
        "CREATE TABLE x AS SELECT 1",
    ],
)
def test_query_cannot_change_anything(tmp_path, sql):
    store = Store.open(tmp_path / "runs.duckdb")
    run_id = synthetic_full_depth_run(store, 30, LAYERS)
    before = store.metrics(run_id)
    with pytest.raises(StoreError, match=r"Store\.query runs one SELECT statement"):
        store.query(sql)
    assert store.metrics(run_id) == before and len(store.predictions(run_id)) == 30


def test_store_connections_cannot_read_other_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not print me")
    store = Store.open(tmp_path / "runs.duckdb")
    for sql in (f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM read_csv('{secret}')"):
        with pytest.raises(StoreError, match="may not touch other files") as caught:
            store.query(sql)
        assert "do not print me" not in str(caught.value)


def test_a_crafted_store_is_refused_and_never_read(tmp_path):
    path = tmp_path / "crafted.duckdb"
    Store.open(path)
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE runs")
    con.execute("CREATE VIEW runs AS SELECT content AS run_id FROM read_text('/etc/hostname')")
    con.close()
    for read_only in (True, False):
        with pytest.raises(StoreError, match=r"is not a plain mhee store: it defines view runs"):
            Store.open(path, read_only=read_only)
    macro = tmp_path / "macro.duckdb"
    Store.open(macro)
    con = duckdb.connect(str(macro))
    con.execute("CREATE MACRO count(x) AS 42")  # would shadow count() in the store's own queries
    con.close()
    with pytest.raises(StoreError, match=r"it defines macro count"):
        Store.open(macro, read_only=True)


def test_a_foreign_duckdb_file_gets_no_mhee_tables(tmp_path):
    path = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sales (id INTEGER)")
    con.close()
    with pytest.raises(StoreError, match=r"is a DuckDB database but not an mhee store \(it holds sales\); use a new"):
        Store.open(path)
    con = duckdb.connect(str(path), read_only=True)
    assert [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()] == ["sales"]
    con.close()
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()  # a DuckDB file with nothing in it is a new store
    assert Store.open(empty).runs().empty
    zero = tmp_path / "zero.duckdb"
    zero.touch()  # so is an empty file
    with pytest.raises(StoreError, match="is an empty file, not an mhee store yet"):
        Store.open(zero, read_only=True)
    assert Store.open(zero).runs().empty


# ---------------------------------------------------------------------------------------- damaged files
@pytest.fixture
def damaged(tmp_path) -> Path:
    path = tmp_path / "runs.duckdb"
    store = Store.open(path)
    for seed in range(3):
        synthetic_full_depth_run(store, 3000, LAYERS, seed=seed)
    return path


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_a_truncated_store_is_named_with_the_fix(damaged, keep):
    data = damaged.read_bytes()
    damaged.write_bytes(data[: int(len(data) * keep)])
    for read_only in (True, False):
        with pytest.raises(StoreError, match=rf"{damaged}.*(truncated|damaged).*restore it from a backup"):
            store = Store.open(damaged, read_only=read_only)
            for run_id in store.runs(include_failed=True)["run_id"]:
                store.predictions(run_id)
                store.metrics(run_id)


def test_empty_schema_version_and_dropped_table(damaged):
    con = duckdb.connect(str(damaged))
    con.execute("DELETE FROM schema_version")
    con.close()
    with pytest.raises(StoreError, match="has an empty schema_version table, so its format is unknown; restore"):
        Store.open(damaged, read_only=True)
    con = duckdb.connect(str(damaged))
    con.execute("INSERT INTO schema_version VALUES (2)")
    con.execute("DROP TABLE layer_outputs")
    con.close()
    with pytest.raises(StoreError, match="lacks the table 'layer_outputs' of an mhee store; restore it"):
        Store.open(damaged)
    con = duckdb.connect(str(damaged))
    con.execute("CREATE TABLE layer_outputs (run_id VARCHAR)")
    con.close()
    with pytest.raises(StoreError, match=r"table 'layer_outputs' lacks columns \['request_id', 'layer'"):
        Store.open(damaged)


def test_missing_folder_and_folder_path(tmp_path):
    with pytest.raises(StoreError, match=rf"folder {tmp_path / 'nope'} does not exist; create it"):
        Store.open(tmp_path / "nope" / "runs.duckdb")
    with pytest.raises(StoreError, match="is a folder; give a file path"):
        Store.open(tmp_path)


def test_a_version_1_store_reads_read_only_and_migrates_when_writable(tmp_path):
    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""
        CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
        CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, status VARCHAR, created TIMESTAMP,
            finished TIMESTAMP, config VARCHAR, versions VARCHAR, exit_layers VARCHAR, num_layers INTEGER,
            requests_key VARCHAR, parent_run VARCHAR, error VARCHAR);
        CREATE TABLE predictions (run_id VARCHAR, request_id BIGINT, "user" BIGINT, item BIGINT, label INTEGER,
            prob DOUBLE, exit_layer INTEGER, latency_s DOUBLE);
        CREATE TABLE layer_outputs (run_id VARCHAR, request_id BIGINT, layer INTEGER, head VARCHAR, prob DOUBLE);
        CREATE TABLE requests (run_id VARCHAR, request_id BIGINT, prompt VARCHAR, retrieved VARCHAR);
        CREATE TABLE metrics (run_id VARCHAR, name VARCHAR, value DOUBLE);
        CREATE TABLE timings (run_id VARCHAR, stage VARCHAR, seconds DOUBLE, requests INTEGER);
        INSERT INTO runs VALUES ('done', 'a', 'live', 'finished', now()::TIMESTAMP - INTERVAL 2 HOUR, now(), '{}',
            '{}', '[3]', 3, '', NULL, NULL);
        INSERT INTO runs VALUES ('stuck', 'b', 'live', 'running', now()::TIMESTAMP - INTERVAL 2 HOUR, NULL, '{}',
            '{}', '[3]', 3, '', NULL, NULL);
        INSERT INTO metrics VALUES ('done', 'auc', 0.7);
    """)
    con.close()
    reader = Store.open(path, read_only=True)
    assert reader.schema_version == 1
    assert reader.runs()["auc"].tolist() == [0.7]
    assert reader.runs(include_failed=True)["status"].tolist() == ["finished", "abandoned"]
    assert reader.run("stuck")["error"].startswith("no heartbeat from a schema-1 writer (no pid recorded)")
    con = duckdb.connect(str(path))
    con.execute("""INSERT INTO runs VALUES ('recent', 'c', 'live', 'running', now()::TIMESTAMP, NULL, '{}', '{}', '[3]',
                   3, '', NULL, NULL)""")
    con.close()
    writer = Store.open(path)
    assert writer.schema_version == 2 and Store.open(path, read_only=True).schema_version == 2
    assert writer.run("stuck")["status"] == "failed"
    with pytest.raises(StoreBusyError, match=r"run recent \('c'\) of a schema-1 writer \(last heartbeat none\)"):
        writer.start_run({}, [3], 3)  # a recent run of an older writer may still be writing
    writer.fail_run("recent", "stopped by hand")
    run_id = writer.start_run({}, [3], 3)
    assert writer.run(run_id)["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------- disk full
def _small_disk(folder: Path) -> bool:
    if os.geteuid() != 0:
        return False
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_fails_the_run_with_a_clear_error(tmp_path):
    disk = tmp_path / "disk"
    if not _small_disk(disk):
        pytest.skip("needs root and `mount -t tmpfs` (a 3 MB disk to fill)")
    try:
        path = disk / "runs.duckdb"
        store = Store.open(path, flush_seconds=0)
        first = synthetic_full_depth_run(store, 50, LAYERS)
        (disk / "ballast").write_bytes(b"0" * 300_000)  # to free once the disk is full
        with (
            pytest.raises(StoreError, match=rf"the disk holding {path} is full .*free space there and run again"),
            store.recording({}, LAYERS, 9) as run_id,
        ):
            for i in range(100_000):
                store.append_batch(run_id, _batch(np.arange(500 * i, 500 * (i + 1))))
        (disk / "ballast").unlink()
        if store.run(run_id)["status"] == "running":  # the failure mark did not fit on the full disk either
            store.fail_run(run_id, "disk full")
        assert store.run(run_id)["status"] == "failed"
        assert store.runs()["run_id"].tolist() == [first] and len(store.predictions(first)) == 50
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
