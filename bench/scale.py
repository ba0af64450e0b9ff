"""Scale-out check of issue 15: local loop vs a Ray actor pool, time and driver memory.

    python bench/scale.py [--sizes 1000,10000,100000] [--workers 2]
    python bench/scale.py --smollm2 [--requests 200]

Tiny mode: the tiny backbone (linear heads fitted on 80 requests) scores N MovieLens requests with
``max-prob`` and logs them to a DuckDB store, once with ``executor="local"`` and once with
``executor="ray"`` (a fresh local cluster, `--workers` actors x 1 CPU). Each measurement runs in its own
process so peak memory is that run's. Memory is sampled from ``/proc/self/status`` every 50 ms:
``RssAnon`` (private memory) and ``RssShmem`` (Ray object-store pages mapped into the driver, shared);
``ru_maxrss`` counts both. Requests are drawn with replacement from all MovieLens interactions (so 100k
exist), with fresh ids.

SmolLM2 mode: heads fitted locally, then the same requests run locally with 1 torch thread and on Ray
with `--workers` actors x 1 CPU; predictions must be identical; the ratio of the two times is Ray's
overhead (1 core locally vs `--workers` cores on Ray: a ratio below 1 means Ray's parallelism won).

Prints a markdown table and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# short prompts, a smaller tiny model and big batches: the executor, the driver and the store are measured
TINY = dict(backbone="tiny", backbone_params={"num_layers": 2, "hidden_size": 16}, retriever="recent", k=1,
            prompt_tokens=240, head="linear", exit_layers=[1, 2], train_requests=80, valid_requests=60,
            batch_size=128)  # fmt: skip
POLICY = ("max-prob", {"threshold": 0.6})


class MemorySampler(threading.Thread):
    """Peak RssAnon / RssShmem (MB) of this process while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssShmem": 0.0}
        self.stopped = threading.Event()

    @staticmethod
    def now() -> dict[str, float]:
        found = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                found[key] = int(value.split()[0]) / 1024
        return found

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            for key, value in self.now().items():
                self.peak[key] = max(self.peak[key], value)


def sampled_requests(exp, n: int, seed: int = 0):
    """`n` requests drawn with replacement from every MovieLens interaction, ids 0..n-1."""
    import numpy as np

    from mhee_sdk.types import Request

    rows = [r for split in ("train", "valid", "test") for r in exp.dataset.requests(split)]
    picks = np.random.default_rng(seed).integers(len(rows), size=n)
    return [Request(i, rows[p].user, rows[p].item, rows[p].label, rows[p].ts) for i, p in enumerate(picks)]


def one(size: int, executor: str, workers: int) -> dict:
    """Fit tiny heads, then time one logged run of `size` requests on `executor` (this process only)."""
    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.executors import RayExecutor
    from mhee_sdk.store import Store

    folder = Path(tempfile.mkdtemp(prefix="mhee-scale-"))
    exp = Experiment(TINY, progress=False, cache_dir=folder / "hidden")
    exp.fit_heads()
    requests = sampled_requests(exp, size)
    cluster_s = 0.0
    if executor == "ray":
        started = time.perf_counter()
        RayExecutor().connect()  # the cluster start is reported on its own
        cluster_s = time.perf_counter() - started
        exp.config = exp.config.replace(executor="ray", num_workers=workers)
    store = Store.open(folder / "runs.duckdb")
    before = MemorySampler.now()
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    result = exp.run(*POLICY, store=store, requests=requests)
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    stored = int(store.query("SELECT count(DISTINCT request_id) FROM predictions").iloc[0, 0])
    return {"size": size, "executor": executor, "workers": workers if executor == "ray" else 1,
            "seconds": seconds, "cluster_s": cluster_s, "stored": stored,
            "anon_growth_mb": sampler.peak["RssAnon"] - before["RssAnon"], "shmem_peak_mb": sampler.peak["RssShmem"],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mean_exit_layer": result.metrics["mean_exit_layer"]}  # fmt: skip


def tiny_table(sizes: list[int], workers: int) -> None:
    rows = []
    for size in sizes:
        for executor in ("local", "ray"):
            out = subprocess.run([sys.executable, __file__, "--one", str(size), executor, "--workers", str(workers)],
                                 capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{executor} run of {size} requests failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print("| requests | executor | run s | requests/s | cluster start s | stored | driver RssAnon growth MB "
          "| peak RssShmem MB | ru_maxrss MB |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "local" if r["executor"] == "local" else f"ray ({r['workers']} workers)"
        print(f"| {r['size']:,} | {name} | {r['seconds']:.1f} | {r['size'] / r['seconds']:.0f} | "
              f"{r['cluster_s']:.1f} | {r['stored']:,} | {r['anon_growth_mb']:.0f} | {r['shmem_peak_mb']:.0f} | "
              f"{r['maxrss_mb']:.0f} |")  # fmt: skip


def smollm2(requests: int, workers: int) -> None:
    import torch

    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.executors import RayExecutor

    config = dict(backbone="smollm2-135m", retriever="recent", train_requests=300, valid_requests=150,
                  eval_requests=requests, batch_size=16)  # fmt: skip
    exp = Experiment(config, progress=False)
    exp.fit_heads()
    chosen = exp.requests()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray worker runs with (1 CPU): bit-identical sums
    started = time.perf_counter()
    local = exp.run(*POLICY, requests=chosen)
    local_s = time.perf_counter() - started
    torch.set_num_threads(threads)
    started = time.perf_counter()
    RayExecutor().connect()
    cluster_s = time.perf_counter() - started
    exp.config = exp.config.replace(executor="ray", num_workers=workers)
    started = time.perf_counter()
    remote = exp.run(*POLICY, requests=chosen)
    ray_s = time.perf_counter() - started
    same = all(a.prob == b.prob and a.exit_layer == b.exit_layer
               for a, b in zip(local.predictions, remote.predictions, strict=True))  # fmt: skip
    print(f"| SmolLM2-135M, {requests} requests | local, 1 thread | ray, {workers} workers x 1 thread |")
    print("|---|---:|---:|")
    print(f"| run s | {local_s:.1f} | {ray_s:.1f} (cluster start {cluster_s:.1f} s, not included) |")
    print(f"| identical predictions and exit layers | | {same} |")
    print(f"| Ray / local time | | {ray_s / local_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "EXECUTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.workers)))
        return
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.smollm2:
        smollm2(args.requests, args.workers)
    else:
        tiny_table([int(s) for s in args.sizes.split(",")], args.workers)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
