"""Retrievers compared on the same requests: build time, latency, genre hit rate, downstream AUC.

    python bench/retrieval.py [--train 300 --valid 150 --test 200] [--skip-downstream]

Latency: per request, batch 1 (median over 30 single-request calls) and batch 256 (median of 3
calls), after one warm-up call that fills per-user caches ("cold" is that first batch-256 call).
Genre hit rate: share of retrieved interactions whose movie shares a genre with the candidate (for
`gcn` users mode every hit is the candidate itself, so it is 1 by construction).
Downstream AUC: the same linear exit heads trained per retriever (SmolLM2 frozen, same train/valid
requests), scored on the same test requests; at the layer best on validation and at the last layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.metrics import auc
from mhee_sdk.registry import get_registry

RETRIEVERS = [
    ("none", {}),
    ("recent", {}),
    ("random", {}),
    ("gcn", {"mode": "users", "progress": False}),
    ("gcn", {"mode": "history", "progress": False}),
    ("llamaindex-bm25", {}),
    ("llamaindex-vector", {}),
]


def genre_hit_rate(retrieved, requests, genres: dict[int, set[str]]) -> float:
    """Share of retrieved interactions whose item shares a genre with the request's candidate."""
    hits = total = 0
    for found, request in zip(retrieved, requests, strict=True):
        wanted = genres.get(request.item, set())
        hits += sum(bool(genres.get(r.item, set()) & wanted) for r in found)
        total += len(found)
    return hits / total if total else float("nan")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--valid", type=int, default=150)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--skip-downstream", action="store_true", help="latency and hit rate only (no LLM)")
    args = parser.parse_args()

    registry = get_registry()
    dataset = registry.create("dataset", "movielens-100k")
    tables = dataset.load()
    genres = {int(i): set(g.split(", ")) for i, g in zip(tables.items["item"], tables.items["genres"], strict=True)}
    requests = dataset.requests("test", limit=256, seed=1)
    print(f"MovieLens-100K test requests: 256 for latency/hit rate, k={args.k}; downstream: {args.train} train / "
          f"{args.valid} valid / {args.test} test requests, SmolLM2-135M frozen, "
          "linear heads every 3rd layer")  # fmt: skip
    header = f"{'retriever':<26}{'build s':>9}{'cold ms':>9}{'b1 ms':>8}{'b256 ms':>9}{'genre hit':>10}"
    print(header + ("" if args.skip_downstream else f"{'AUC best (layer)':>18}{'AUC last':>10}"))
    for name, params in RETRIEVERS:
        if name not in {n.removesuffix("<spec>") for n in registry.names("retriever")}:
            print(f"{name:<26}not installed")
            continue
        label = f"{name}({params['mode']})" if "mode" in params else name
        retriever = registry.create("retriever", name, **params)
        started = time.perf_counter()
        retriever.fit(tables.split("train"), dataset.log)
        build = time.perf_counter() - started
        started = time.perf_counter()
        retrieved = retriever.retrieve(requests, args.k)
        cold = (time.perf_counter() - started) / len(requests) * 1e3
        batch = []
        for _ in range(3):
            started = time.perf_counter()
            retriever.retrieve(requests, args.k)
            batch.append((time.perf_counter() - started) / len(requests) * 1e3)
        single = []
        for request in requests[:30]:
            started = time.perf_counter()
            retriever.retrieve([request], args.k)
            single.append((time.perf_counter() - started) * 1e3)
        line = (f"{label:<26}{build:>9.2f}{cold:>9.2f}{statistics.median(single):>8.2f}"
                f"{statistics.median(batch):>9.3f}{genre_hit_rate(retrieved, requests, genres):>10.2f}")  # fmt: skip
        if not args.skip_downstream:
            best, best_layer, last = downstream(name, params, args)
            line += f"{best:>12.3f} ({best_layer:>2}){last:>10.3f}"
        print(line, flush=True)


def downstream(name: str, params: dict, args) -> tuple[float, int, float]:
    """Train linear heads on prompts built with this retriever; test AUC at the best (on validation) and last layer."""
    config = RunConfig(retriever=name, retriever_params=params, k=args.k, head="linear",
                       train_requests=args.train, valid_requests=args.valid, eval_requests=args.test)  # fmt: skip
    experiment = Experiment(config, progress=False)
    report = experiment.fit_heads()
    hidden, labels, _ = experiment.features("test", args.test)
    scores = {}
    with torch.no_grad():
        for j, layer in enumerate(experiment.heads.layers):
            probs = experiment.heads[layer](torch.as_tensor(np.asarray(hidden[:, j], dtype=np.float32)))
            scores[layer] = auc(labels, probs.numpy())
    best_layer = max(report.valid_auc, key=report.valid_auc.get)  # chosen on validation, scored on test
    return scores[best_layer], best_layer, scores[experiment.heads.layers[-1]]


if __name__ == "__main__":
    main()
