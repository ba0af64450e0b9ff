from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mhee_sdk.exits.policies import Calibrated, MaxProb, MultiHead
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


# ---------------------------------------------------------------------------------------- replay by name
@pytest.fixture(scope="module")
def builtins_registry():
    from mhee_sdk.registry import Registry

    return Registry(load_entry_points=False, disable=[])


def test_replay_by_name_equals_replay_of_the_object(tmp_path, builtins_registry):
    store = Store.open(tmp_path / "runs.duckdb", registry=builtins_registry)
    run_id = fake_full_depth_run(store, 400, [3, 6, 9, 12])
    by_name = store.replay(run_id, "multi-head", ratio=2.0, window=1)
    by_object = store.replay(run_id, MultiHead(ratio=2.0, window=1))
    pd.testing.assert_frame_equal(by_name.predictions, by_object.predictions)
    assert by_name.metrics == by_object.metrics
    assert by_name.metrics != store.replay(run_id, "multi-head", ratio=2.0, window=3).metrics  # parameters count
    assert by_name.predictions["exit_layer"].nunique() > 1  # the policy exits early somewhere: a real comparison


def test_sweep_by_name_varies_the_parameter_given_as_a_list(tmp_path, builtins_registry):
    store = Store.open(tmp_path / "runs.duckdb", registry=builtins_registry)
    run_id = fake_full_depth_run(store, 400, [3, 6, 9, 12])
    table = store.sweep(run_id, "multi-head", ratio=[1.5, 3.0, 8.0], window=1)
    assert table.columns.tolist() == ["policy", "ratio", "auc", "mean_exit_layer", "layer_savings"]
    assert table["ratio"].tolist() == [1.5, 3.0, 8.0]
    assert table["policy"].tolist() == [MultiHead(ratio=r, window=1) for r in (1.5, 3.0, 8.0)]  # window stays fixed
    objects = store.sweep(run_id, [MultiHead(ratio=r, window=1) for r in (1.5, 3.0, 8.0)])
    pd.testing.assert_frame_equal(table.drop(columns="ratio"), objects)
    assert table["mean_exit_layer"].is_monotonic_increasing and table["mean_exit_layer"].nunique() == 3
    numpy_grid = store.sweep(run_id, "max-prob", threshold=np.array([0.6, 0.9]))
    assert numpy_grid["threshold"].tolist() == [0.6, 0.9] and type(numpy_grid["policy"][0].threshold) is float
    assert store.sweep(run_id, ["max-prob", MaxProb(0.6)])["policy"].tolist() == [MaxProb(), MaxProb(0.6)]
    single = store.sweep(run_id, "max-prob", threshold=0.7)
    assert single.columns.tolist() == ["policy", "auc", "mean_exit_layer", "layer_savings"] and len(single) == 1


def test_policy_names_come_from_the_process_registry_on_first_use(tmp_path, monkeypatch, builtins_registry):
    from mhee_sdk import registry as registry_module

    store = Store.open(tmp_path / "runs.duckdb")
    run_id = fake_full_depth_run(store, 50, [3, 6])
    monkeypatch.setattr(registry_module, "_default", None)  # no registry yet: the store must not build one early
    store.replay(run_id, MaxProb(0.7))
    store.sweep(run_id, [MaxProb(0.7)])
    assert store.registry is None and registry_module._default is None
    monkeypatch.setattr(registry_module, "_default", builtins_registry)  # what get_registry() returns now
    assert store.replay(run_id, "max-prob", threshold=0.7).metrics == store.replay(run_id, MaxProb(0.7)).metrics
    assert store.registry is builtins_registry


def test_replay_by_name_errors(tmp_path, builtins_registry):
    from mhee_sdk.registry import UnknownNameError

    store = Store.open(tmp_path / "runs.duckdb", registry=builtins_registry)
    run_id = fake_full_depth_run(store, 50, [3, 6])
    with pytest.raises(UnknownNameError, match=r"exit policy 'maxprob' is unknown; .*did you mean 'max-prob'"):
        store.replay(run_id, "maxprob", threshold=0.7)
    with pytest.raises(UnknownNameError, match="did you mean 'entropy'"):
        store.sweep(run_id, "entropi", threshold=[0.2, 0.4])
    with pytest.raises(TypeError, match="treshold"):
        store.replay(run_id, "max-prob", treshold=0.7)
    with pytest.raises(ValueError, match=r"threshold=1.5 is outside \[0.5, 1.0\]"):
        store.sweep(run_id, "max-prob", threshold=[0.7, 1.5])
    with pytest.raises(ValueError, match="a sweep varies one parameter, but ratio, window are all lists"):
        store.sweep(run_id, "multi-head", ratio=[2.0, 3.0], window=[1, 2])
    with pytest.raises(ValueError, match=r"threshold=\[\] gives a sweep nothing to replay"):
        store.sweep(run_id, "max-prob", threshold=[])
    with pytest.raises(ValueError, match=r"parameters \['threshold'\] go with a policy name, not an object"):
        store.replay(run_id, MaxProb(0.7), threshold=0.8)
    with pytest.raises(ValueError, match=r"parameters \['threshold'\] go with a policy name, not a list"):
        store.sweep(run_id, [MaxProb(0.7)], threshold=[0.8])
    with pytest.raises(TypeError, match=r"does not follow mhee_sdk\.interfaces\.ExitPolicy: missing name, decide"):
        store.replay(run_id, object())


def test_an_uncalibrated_policy_cannot_be_replayed_from_the_store(tmp_path, builtins_registry):
    store = Store.open(tmp_path / "runs.duckdb", registry=builtins_registry)
    run_id = fake_full_depth_run(store, 400, [3, 6, 9])
    message = r"policy 'calibrated' is not calibrated.*pass a calibrated object .* or its calibrated parameters"
    with pytest.raises(ValueError, match=message + r" \(thresholds=\.\.\., as a run of it stores them"):
        store.replay(run_id, "calibrated", budget=0.01)
    with pytest.raises(ValueError, match=message):
        store.replay(run_id, Calibrated())
    with pytest.raises(ValueError, match=message):
        store.sweep(run_id, "calibrated", budget=[0.01, 0.02])
    thresholds = {"3": 0.8, "6": 0.7}  # as a run's config stores them: layers as text
    by_name = store.replay(run_id, "calibrated", thresholds=thresholds)
    assert by_name.metrics == store.replay(run_id, Calibrated(thresholds={3: 0.8, 6: 0.7})).metrics
    assert by_name.metrics["mean_exit_layer"] < 9  # the thresholds are used: some requests exit early
