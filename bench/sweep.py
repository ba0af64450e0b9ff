"""Offline policy sweep speed: 1,000 `max-prob` thresholds replayed over 5,000 logged full-depth requests.

    python bench/sweep.py [--requests 5000] [--settings 1000] [--repeats 5]

Writes a synthetic full-depth run (`mhee_sdk.testing.synthetic_full_depth_run`: 10 exit layers, heads
that sharpen with depth) to a temporary DuckDB store, then times `Store.sweep` (median of `--repeats`,
after one warm-up call that loads the run's per-layer matrix, as a notebook's first call would) and one
`Store.replay` for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mhee_sdk.exits.policies import MaxProb
from mhee_sdk.store import Store
from mhee_sdk.testing import synthetic_full_depth_run

LAYERS = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def main() -> None:
    """Time the sweep and print the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--settings", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Path(folder) / "sweep.duckdb")
        run_id = synthetic_full_depth_run(store, args.requests, LAYERS, users=500)
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
