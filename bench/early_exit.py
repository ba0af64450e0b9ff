"""Early exit vs full depth on the same held-out requests: quality and measured speed, in one run.

    python bench/early_exit.py [--requests 100] [--repeats 3] [--batch-sizes 1 32] [--backbone smollm2-135m]
    python bench/early_exit.py --backbone gemma3-270m --train 100 --valid 60 --requests 60 --repeats 1 \
        --batch-sizes 32   # the optional second model (`mhee assets install gemma3-270m`), a smaller sample

For every policy: AUC, AUC delta vs full depth, mean exit layer, ideal speedup (layers / mean exit
layer), measured wall-clock speedup vs the full-depth engine on the same requests and batch size,
and the share of the ideal that was realised. "hf forward" is the naive baseline: the model's own
full forward pass on the same batches (no heads, no early exit). Every timing is the median of
`--repeats` runs; configurations are interleaved inside each repeat so drift affects all alike.

After each batch size's table, a profile of one more full-depth run and one early-exit run says where
the time went: tokenising and embedding (`start`), decoder layers, exit heads, policy, the rest
(compaction, bookkeeping); and what one decoder layer costs per row at each batch width, which is why
a compacted batch does not realise all of its ideal speedup (fewer rows per layer run less efficiently).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

from mhee_sdk.config import RunConfig
from mhee_sdk.demo import DEMO_CONFIG
from mhee_sdk.evaluation import Experiment
from mhee_sdk.metrics import auc

POLICIES = [
    ("never", {}),
    ("fixed-layer", {"layer": 12}),
    ("fixed-layer", {"layer": 6}),
    ("max-prob", {"threshold": 0.75}),
    ("entropy", {"threshold": 0.8}),
    ("margin", {"threshold": 0.5}),
    ("patience", {"patience": 2}),
    ("multi-head", {"ratio": 2.0, "window": 2}),
    ("calibrated", {"budget": 0.005}),
]


def hf_forward_seconds(backbone, texts: list[str], batch_size: int) -> float:
    """The naive baseline: the model's own forward over all layers, same batches."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = backbone.tokenizer(
                [backbone.format(t) for t in texts[start : start + batch_size]],
                padding=True, return_tensors="pt", add_special_tokens=backbone.plain_prompts,  # as the backbone
            ).to(backbone.device)  # fmt: skip
            backbone.model.model(**batch)
    return time.perf_counter() - started


@contextmanager
def timed(backbone, heads, policy, totals: dict[str, float], per_width: dict[int, list[float]]):
    """Wrap the engine's collaborators with timers (on the instances only; removed afterwards)."""

    def wrap(owner, name: str, key: str, width=None):
        original = getattr(owner, name)

        def timer(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            spent = time.perf_counter() - started
            totals[key] += spent
            if width is not None:
                per_width[width(*args)].append(spent)
            return out

        setattr(owner, name, timer)

    wrap(backbone, "start", "start (tokenise, embed)")
    wrap(backbone, "step", "decoder layers", width=lambda state: int(state.hidden.shape[0]))
    wrap(backbone, "pooled", "exit heads")
    wrap(heads, "predict", "exit heads")
    wrap(policy, "decide", "policy")
    try:
        yield
    finally:
        for owner, name in ((backbone, "start"), (backbone, "step"), (backbone, "pooled"), (heads, "predict"),
                            (policy, "decide")):  # fmt: skip
            del owner.__dict__[name]


def print_profile(experiment, policies, texts, ids, extra, batch_size: int) -> None:
    """Where one run's time goes, for full depth and the first early-exit policy that exits."""
    for name, params, policy in policies:
        totals: dict[str, float] = defaultdict(float)
        per_width: dict[int, list[float]] = defaultdict(list)
        engine = experiment.engine(policy)
        with timed(experiment.backbone, experiment.heads, policy, totals, per_width):
            started = time.perf_counter()
            engine.run(texts, ids, batch_size=batch_size, progress=False, features=extra)
            wall = time.perf_counter() - started
        totals["rest (compaction, bookkeeping)"] = wall - sum(totals.values())
        row_layers = sum(width * len(times) for width, times in per_width.items())
        parts = ", ".join(f"{key} {value:.2f} s ({value / wall:.0%})" for key, value in totals.items())
        print(f"profile {name}{params or ''}: {wall:.2f} s, {row_layers} row-layers; {parts}")
        widths = sorted(per_width, reverse=True)
        cost = "  ".join(f"{w}: {1000 * statistics.median(per_width[w]) / w:.2f}" for w in widths[:6])
        if len(widths) > 6:
            cost += f"  ... {widths[-1]}: {1000 * statistics.median(per_width[widths[-1]]) / widths[-1]:.2f}"
        print(f"  one decoder layer, ms per row, by rows in the batch: {cost}")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--backbone", default=DEMO_CONFIG.backbone)
    parser.add_argument("--head", default=DEMO_CONFIG.head)
    parser.add_argument("--train", type=int, default=DEMO_CONFIG.train_requests, help="requests to train heads on")
    parser.add_argument("--valid", type=int, default=DEMO_CONFIG.valid_requests, help="validation requests")
    parser.add_argument("--profile", default="max-prob", help="the early-exit policy to profile")
    args = parser.parse_args()

    config: RunConfig = DEMO_CONFIG.replace(backbone=args.backbone, head=args.head, eval_requests=args.requests,
                                              train_requests=args.train, valid_requests=args.valid)  # fmt: skip
    experiment = Experiment(config, progress=False)
    experiment.fit_heads()
    requests = experiment.requests()
    texts, retrieved = experiment.prompts(requests)
    extra = experiment.extra_features(requests, retrieved)
    labels = np.array([r.label for r in requests])
    ids = [r.request_id for r in requests]
    backbone = experiment.backbone
    policies = [(name, params, experiment.make_policy(name, params)) for name, params in POLICIES]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {backbone.device}; backbone {backbone.name} ({backbone.num_layers} layers, "
          f"{str(getattr(backbone, 'dtype', '?')).removeprefix('torch.')}); "
          f"{len(requests)} held-out test requests (N); head {config.head} trained on {config.train_requests} "
          f"train / {config.valid_requests} valid requests; "
          f"median of {args.repeats} repeats")  # fmt: skip

    for batch_size in args.batch_sizes:
        seconds: dict[str, list[float]] = {"hf forward": []}
        quality: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            seconds["hf forward"].append(hf_forward_seconds(backbone, texts, batch_size))
            for name, params, policy in policies:
                label = f"{name}{params}" if params else name
                engine = experiment.engine(policy)  # the system message the heads were trained with
                started = time.perf_counter()
                predictions = engine.run(texts, ids, batch_size=batch_size, progress=False, features=extra)
                seconds.setdefault(label, []).append(time.perf_counter() - started)
                quality[label] = (auc(labels, [p.prob for p in predictions]),
                                  float(np.mean([p.exit_layer for p in predictions])))  # fmt: skip
        full = statistics.median(seconds["never"])
        full_auc = quality["never"][0]
        print(f"\nbatch size {batch_size}: full depth {full:.2f} s for {len(requests)} requests "
              f"({len(requests) / full:.2f} requests/s)")  # fmt: skip
        print(f"{'policy':<40}{'AUC':>7}{'dAUC':>8}{'mean L':>8}{'ideal':>7}{'measured':>10}{'realised':>10}")
        hf = statistics.median(seconds["hf forward"])
        print(f"{'hf forward (naive, no heads)':<40}{'-':>7}{'-':>8}{backbone.num_layers:>8}{'1.00x':>7}"
              f"{full / hf:>9.2f}x{'-':>10}")  # fmt: skip
        for label, (value, mean_layer) in quality.items():
            ideal = backbone.num_layers / mean_layer
            measured = full / statistics.median(seconds[label])
            print(f"{label[:39]:<40}{value:>7.3f}{value - full_auc:>+8.3f}{mean_layer:>8.1f}{ideal:>6.2f}x"
                  f"{measured:>9.2f}x{measured / ideal:>9.0%}")  # fmt: skip
        profiled = [policies[0], next(p for p in policies[1:] if p[0] == args.profile)]
        print_profile(experiment, profiled, texts, ids, extra, batch_size)


if __name__ == "__main__":
    main()
