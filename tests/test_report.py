"""The text tables of `mhee report` / `mhee eval` and the demo's cold-items line, from a real store."""

from __future__ import annotations

import math

from mhee_sdk.report import format_runs, format_slice_line, format_slices, runs_table
from mhee_sdk.store import Store

CUTS = {"cold_threshold": 5.0, "train_min@light_users": 5.0, "train_min@medium_users": 12.0,
        "train_min@heavy_users": 40.0}  # fmt: skip


def _run(store: Store, name: str, kind: str, auc: float, cold_auc: float) -> str:
    slices = {}
    for slice_name, n in (("cold_items", 7), ("cold_users", 3), ("light_users", 10), ("medium_users", 0),
                          ("heavy_users", 20)):  # fmt: skip
        slices |= {f"auc@{slice_name}": cold_auc if n else math.nan, f"gauc@{slice_name}": math.nan,
                   f"logloss@{slice_name}": 0.6 if n else math.nan, f"requests@{slice_name}": n}  # fmt: skip
    metrics = {"auc": auc, "gauc": 0.6, "logloss": 0.65, "mean_exit_layer": 30.0 if name == "full" else 12.0,
               "requests": 40, **slices, **CUTS}  # fmt: skip
    with store.recording({"policy": name}, [3, 30] if kind == "live" else [], 30, name=name, kind=kind) as run_id:
        store.add_metrics(run_id, metrics)
    return run_id


def test_slice_table_and_demo_line(tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    full = _run(store, "full", "live", 0.70, 0.61)
    _run(store, "max-prob", "live", 0.69, 0.64)
    _run(store, "patience", "live", 0.68, 0.58)
    _run(store, "popularity", "baseline", 0.66, 0.52)
    _run(store, "collab-logistic", "baseline", 0.71, 0.55)
    table = runs_table(store)
    assert format_runs(table).splitlines()[1].startswith("full ")
    lines = format_slices(table).splitlines()
    assert lines[0].split() == ["AUC", "(requests)", "cold", "items", "cold", "users", "light", "users", "medium",
                                "users", "heavy", "users"]  # fmt: skip
    assert lines[1].split() == ["full", "0.610", "(7)", "0.610", "(3)", "0.610", "(10)", "-", "(0)", "0.610", "(20)"]
    assert lines[-1] == ("cold: fewer than 5 training interactions; warm users by training interactions (terciles): "
                         "light 5-11, medium 12-39, heavy 40+")  # fmt: skip
    assert format_slice_line(table, full) == (
        "cold items (fewer than 5 training interactions, 7 of 40 requests): AUC full depth 0.610, "
        "best early exit 0.640 (max-prob), best baseline 0.550 (collab-logistic)"
    )
