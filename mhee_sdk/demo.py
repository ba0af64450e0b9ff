"""`mhee demo`: the pipeline pieces that exist so far, end to end on real data and the real model.

Zero-shot: MovieLens-100K test requests, the `recent` retriever, SmolLM2-135M run layer by layer with
the verbalizer head ("Yes" vs "No" logits) on every 3rd layer, full depth versus max-prob early exit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from mhee_sdk.data.prompt import PromptBuilder
from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.exits.heads import build_heads
from mhee_sdk.registry import create

DEFAULT_SAMPLES = 64


def run_demo(samples: int | None = None, out_dir: str | Path = "demo_out") -> None:
    """Score `samples` test requests at full depth and with early exit; print a table."""
    samples = samples or DEFAULT_SAMPLES
    dataset = create("dataset", "movielens-100k")
    tables = dataset.load()
    requests = dataset.requests("test", limit=samples, seed=0)
    retriever = create("retriever", "recent").fit(tables.split("train"), dataset.log)
    backbone = create("backbone", "smollm2-135m")
    builder = PromptBuilder(tables.users, tables.items, max_tokens=160, count_tokens=backbone.count_tokens)
    texts = builder.build_many(requests, retriever.retrieve(requests, k=10))
    heads = build_heads("verbalizer", backbone)
    labels = np.array([r.label for r in requests])
    print(f"MovieLens-100K: {samples} test requests, recent-10 retriever, SmolLM2-135M, verbalizer heads")
    print(f"{'policy':<22}{'AUC':>7}{'mean exit':>11}{'seconds':>9}")
    for name, params in [("never", {}), ("max-prob", {"threshold": 0.6})]:
        engine = EarlyExitEngine(backbone, heads, create("exit_policy", name, **params))
        started = time.perf_counter()
        predictions = engine.run(texts, [r.request_id for r in requests], batch_size=16)
        seconds = time.perf_counter() - started
        auc = roc_auc_score(labels, [p.prob for p in predictions])
        mean_exit = np.mean([p.exit_layer for p in predictions])
        print(f"{name + str(params or ''):<22}{auc:>7.3f}{mean_exit:>11.1f}{seconds:>9.1f}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
