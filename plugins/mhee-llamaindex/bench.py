"""Measures build time and per-request latency of llamaindex-bm25 and llamaindex-vector on MovieLens-100K.

Run: ``.venv/bin/python plugins/mhee-llamaindex/bench.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

from mhee_llamaindex import BM25HistoryRetriever, VectorHistoryRetriever, minilm_embedding
from mhee_llamaindex.history import HistoryRetriever
from mhee_llamaindex.vector import LAST_TS

from mhee_sdk import MovieLens100K
from mhee_sdk.types import Request


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def latency(retriever: HistoryRetriever, singles: list[Request], batch: list[Request], k: int = 5) -> str:
    """Median ms/request at batch 1 and mean ms/request at batch 256."""
    one = statistics.median(seconds(lambda r=r: retriever.retrieve([r], k)) for r in singles) * 1e3
    many = seconds(lambda: retriever.retrieve(batch, k)) / len(batch) * 1e3
    return f"batch 1: {one:.1f} ms/request, batch {len(batch)}: {many:.1f} ms/request"


def rss_mib() -> float:
    """Peak resident memory of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    dataset = MovieLens100K()
    tables = dataset.load()
    train, log = tables.split("train"), dataset.log
    singles = dataset.requests("test", limit=20, seed=1)
    batch = dataset.requests("test", limit=256, seed=2)
    print(f"start: {rss_mib():.0f} MiB")

    bm25 = BM25HistoryRetriever().fit(train, log)
    print("bm25 cold (an index per request):", latency(bm25, singles, batch))
    print("bm25 warm (indexes cached):", latency(bm25, singles, batch))

    start = time.perf_counter()
    model = minilm_embedding()
    print(f"vector: import + load all-MiniLM-L6-v2: {time.perf_counter() - start:.1f} s")
    vector = VectorHistoryRetriever(embed_model=model)
    print(f"vector fit (embed {len(tables.items)} items): {seconds(lambda: vector.fit(train, log)):.1f} s")
    print("vector cold (builds the batch's user indexes):", latency(vector, singles, batch))
    print("vector warm (indexes cached):", latency(vector, singles, batch))
    vector.fit(train, log)  # same embeddings, no indexes
    everyone = [Request(-1, int(user), 1, 0, LAST_TS) for user in tables.users["user"]]
    print(f"vector: index all {len(everyone)} users: {seconds(lambda: vector.retrieve(everyone, 1)):.1f} s")
    print(f"peak memory after that: {rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
