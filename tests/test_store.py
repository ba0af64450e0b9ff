from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mhee_sdk.exits.policies import MaxProb
from mhee_sdk.metrics import rank_auc
from mhee_sdk.store import Store, StoreError
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
