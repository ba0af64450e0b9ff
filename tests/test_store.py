from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mhee_sdk.exits.policies import MaxProb
from mhee_sdk.metrics import rank_auc
from mhee_sdk.store import Store, StoreError, Terminated
from mhee_sdk.testing import synthetic_full_depth_run


def fake_full_depth_run(store: Store, n: int, layers: list[int], seed: int = 0) -> str:
    return synthetic_full_depth_run(store, n, layers, seed=seed)


def test_round_trip_and_read_only(tmp_path):
    path = tmp_path / "runs.duckdb"
    store = Store.open(path)
    run_id = fake_full_depth_run(store, 50, [3, 6, 9])
    reader = Store.open(path, read_only=True)
    record = reader.run(run_id)
    assert record["status"] == "finished" and record["exit_layers"] == [3, 6, 9]
    assert record["versions"]["mhee-sdk"] == "0.1.0"
    preds = reader.predictions(run_id)
    assert len(preds) == 50 and preds["exit_layer"].eq(9).all()
    _, layers, matrix = reader.layer_matrix(run_id)
    assert layers == [3, 6, 9] and matrix.shape == (50, 3)
    np.testing.assert_array_equal(matrix[:, -1], preds["prob"].to_numpy())
    runs = reader.runs()
    assert runs["run_id"].tolist() == [run_id] and "auc" in runs.columns
    with pytest.raises(StoreError, match="opened read-only"):
        reader.start_run({}, [3], 3)


def test_finished_runs_are_immutable(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    run_id = fake_full_depth_run(store, 10, [3, 6])
    with pytest.raises(StoreError, match=f"run '{run_id}' is finished; finished and failed runs are immutable"):
        store.add_metrics(run_id, {"auc": 1.0})


def test_interrupted_run_is_marked_failed_and_not_reported(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    with pytest.raises(KeyboardInterrupt), store.recording({"policy": "never"}, [3], 3) as run_id:
        store.add_timing(run_id, "engine", 1.0, 1)
        raise KeyboardInterrupt
    record = store.run(run_id)
    assert record["status"] == "failed" and record["error"].startswith("KeyboardInterrupt")
    assert store.runs().empty
    assert store.runs(include_failed=True)["run_id"].tolist() == [run_id]
    with pytest.raises(StoreError, match="only finished runs can be replayed"):
        store.replay(run_id, MaxProb())


def test_read_only_open_of_missing_and_corrupt_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "nope.duckdb", read_only=True)
    corrupt = tmp_path / "corrupt.duckdb"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a readable DuckDB file"):
        Store.open(corrupt)


def test_newer_schema_is_refused(tmp_path):
    import duckdb

    path = tmp_path / "runs.duckdb"
    Store.open(path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE schema_version SET version = 99")
    con.close()
    with pytest.raises(StoreError, match="schema 99, newer than this mhee-sdk understands"):
        Store.open(path, read_only=True)


def test_replay_and_sweep(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    layers = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    run_id = fake_full_depth_run(store, 5000, layers)
    loose, strict = store.replay(run_id, MaxProb(threshold=0.6)), store.replay(run_id, MaxProb(threshold=0.99))
    assert loose.metrics["mean_exit_layer"] < strict.metrics["mean_exit_layer"]
    policies = [MaxProb(threshold=float(t)) for t in np.linspace(0.5, 1.0, 1000)]
    table = store.sweep(run_id, policies)  # its speed is measured by bench/sweep.py, not asserted here
    assert len(table) == 1000 and table["mean_exit_layer"].is_monotonic_increasing
    row = table.iloc[200]
    assert row["auc"] == pytest.approx(store.replay(run_id, row["policy"]).metrics["auc"], abs=1e-12)


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.uniform(0, 1, 300), 1)  # many ties
    assert rank_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(rank_auc(np.ones(5), scores[:5]))


def test_runs_table_has_one_row_per_run(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    ids = [fake_full_depth_run(store, 20, [3, 6], seed=s) for s in range(4)]
    runs = store.runs()
    assert runs["run_id"].tolist() == ids and runs["auc"].notna().all()


def test_batches_carry_the_heartbeat_and_the_writer_is_recorded(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb", flush_seconds=0)
    run_id = store.start_run({}, [3, 6], 6)
    started = store.run(run_id)
    assert started["pid"] == os.getpid() and started["host"] == socket.gethostname()
    time.sleep(0.01)
    store.append_batch(
        run_id,
        {
            "predictions": pd.DataFrame(
                {
                    "request_id": [1],
                    "user": [2],
                    "item": [3],
                    "label": [1],
                    "prob": [0.7],
                    "exit_layer": [6],
                    "latency_s": [0.1],
                }
            )
        },
    )
    assert store.run(run_id)["heartbeat"] > started["heartbeat"]
    with pytest.raises(ValueError, match="table 'runs' is not appendable; choose from: predictions, layer_outputs"):
        store.append_batch(run_id, {"runs": pd.DataFrame()})
    store.finish_run(run_id)
    assert store.status_counts() == {"finished": 1, "running": 0, "abandoned": 0, "failed": 0}


def _default_handlers() -> bool:
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    return handlers == (signal.default_int_handler, signal.SIG_DFL)


def _interrupt_while_marking(store: Store, monkeypatch, signum: int) -> None:
    write = store._set_status

    def marking_interrupted(run_id: str, status: str, error: str | None) -> None:
        os.kill(os.getpid(), signum)  # arrives while the run's end is being written
        time.sleep(0.05)  # the handler runs here: it must not stop the marking
        write(run_id, status, error)

    monkeypatch.setattr(store, "_set_status", marking_interrupted)


def test_sigterm_fails_the_run_and_a_second_interrupt_waits_for_the_mark(tmp_path, monkeypatch):
    if not _default_handlers():
        pytest.skip("the test runner replaced the default SIGINT/SIGTERM handlers")
    store = Store.open(tmp_path / "runs.duckdb")
    _interrupt_while_marking(store, monkeypatch, signal.SIGINT)
    with pytest.raises(Terminated) as caught, store.recording({}, [3], 3) as run_id:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert caught.value.code == 143
    assert store.run(run_id)["status"] == "failed" and store.run(run_id)["error"].startswith("Terminated: SIGTERM")
    assert _default_handlers()  # restored


def test_an_interrupt_during_finish_finishes_the_run_first(tmp_path, monkeypatch):
    if not _default_handlers():
        pytest.skip("the test runner replaced the default SIGINT/SIGTERM handlers")
    store = Store.open(tmp_path / "runs.duckdb")
    _interrupt_while_marking(store, monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), store.recording({}, [3], 3) as run_id:
        pass
    assert store.run(run_id)["status"] == "finished"
