"""Offline policy sweep speed: 1,000 `max-prob` thresholds replayed over 5,000 logged full-depth requests.

    python bench/sweep.py [--requests 5000] [--settings 1000] [--repeats 5]

Writes a synthetic full-depth run (10 exit layers, heads that sharpen with depth) to a temporary DuckDB
store, then times `Store.sweep` (median of `--repeats`, after one warm-up call that loads the run's
per-layer matrix, as a notebook's first call would) and one `Store.replay` for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mhee_sdk.exits.policies import MaxProb
from mhee_sdk.store import Store

LAYERS = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def logged_run(store: Store, n: int, seed: int = 0) -> str:
    """A finished full-depth run of n requests with every exit layer's output logged."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = (2 * labels - 1)[:, None] * np.linspace(0.2, 1.5, len(LAYERS)) + rng.normal(0, 1, (n, len(LAYERS)))
    probs = 1 / (1 + np.exp(-logits))
    with store.recording({"policy": "never"}, LAYERS, LAYERS[-1], name="full depth") as run_id:
        store.append(run_id, "predictions", pd.DataFrame({
            "request_id": np.arange(n), "user": rng.integers(0, 500, n), "item": rng.integers(0, 1000, n),
            "label": labels, "prob": probs[:, -1], "exit_layer": LAYERS[-1], "latency_s": 0.0}))  # fmt: skip
        store.append(run_id, "layer_outputs", pd.DataFrame({
            "request_id": np.repeat(np.arange(n), len(LAYERS)), "layer": np.tile(LAYERS, n), "head": "linear",
            "prob": probs.ravel()}))  # fmt: skip
    return run_id


def main() -> None:
    """Time the sweep and print the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--settings", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Path(folder) / "sweep.duckdb")
        run_id = logged_run(store, args.requests)
        policies = [MaxProb(threshold=float(t)) for t in np.linspace(0.5, 1.0, args.settings)]
        store.sweep(run_id, policies[:1])  # warm-up: loads the per-layer matrix once
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            table = store.sweep(run_id, policies)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.replay(run_id, policies[len(policies) // 2])
        one = time.perf_counter() - started
    print(f"sweep of {len(table)} max-prob settings over {args.requests} logged requests x {len(LAYERS)} exit "
          f"layers: {statistics.median(times):.3f} s (median of {args.repeats}; "
          f"{1000 * statistics.median(times) / len(table):.2f} ms per setting); one replay: {one:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
