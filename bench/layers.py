"""How fast can every decoder layer be on this machine? Precision and execution options, side by side, with AUC.

    python bench/layers.py [--requests 64] [--repeats 3] [--batch-sizes 1 32] [--options ...] [--auc]

For each option (fp32 eager = today's default, bf16 eager, autocast bf16, torch.compile'd layers in fp32
and bf16, int8 dynamic quantisation of the linear layers): full-depth time per request through the
engine's own layer loop (``mhee_sdk.loop.LayerLoop``) on the demo's held-out prompts, at each batch size.
Options are interleaved inside each repeat, so machine drift hits all alike; the table shows medians
and each option's speedup over fp32 eager measured in the same run. A compiled option's first pass
(compilation) is timed on its own and reported as warm-up.

With ``--auc``: each option's own hidden states train the demo's hybrid heads (cached per option), and
the full-depth AUC on the demo's 200 test requests is printed beside fp32's, plus one early-exit policy
(patience 2) timed against fp32 eager full depth: the combined ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from mhee_sdk.backbones.hf import NATIVE_BF16_CPU_FLAGS, auto_dtype, cpu_flags
from mhee_sdk.demo import DEMO_CONFIG
from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.evaluation import Experiment
from mhee_sdk.loop import LayerLoop
from mhee_sdk.metrics import auc
from mhee_sdk.registry import get_registry

OPTIONS: dict[str, dict[str, object]] = {
    "fp32 eager": {"dtype": "float32"},
    "bf16 eager": {"dtype": "bfloat16"},
    "autocast bf16": {"dtype": "float32", "autocast": True},
    "compile fp32": {"dtype": "float32", "compile": True},
    "compile bf16": {"dtype": "bfloat16", "compile": True},
    "int8 dynamic": {"dtype": "float32", "quantize": "int8"},
}
REFERENCE = "fp32 eager"


def full_depth_seconds(backbone, texts: list[str], batch_size: int, system: str | None) -> float:
    """Seconds to run every prompt through every layer (no heads), in batches."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            for _ in LayerLoop(backbone, texts[start : start + batch_size], [backbone.num_layers], system=system):
                pass
    return time.perf_counter() - started


def main() -> None:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="held-out prompts timed per batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--auc", action="store_true", help="also train heads on each option's states and score AUC")
    args = parser.parse_args()
    options = [REFERENCE, *[o for o in args.options if o != REFERENCE]]

    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 units: {native or 'none'}; "
          f"auto picks {auto_dtype(torch.device('cpu'))[0]} ({auto_dtype(torch.device('cpu'))[1]})")  # fmt: skip
    registry = get_registry()
    reference = Experiment(DEMO_CONFIG.replace(backbone_params=OPTIONS[REFERENCE]), progress=False)
    requests = reference.requests(limit=args.requests)
    texts, _ = reference.prompts(requests)
    system = reference.system
    backbones = {REFERENCE: reference.backbone}
    warmup: dict[str, float] = {}
    for option in options[1:]:
        backbones[option] = registry.create("backbone", DEMO_CONFIG.backbone, **OPTIONS[option])
        if OPTIONS[option].get("compile"):  # the first pass compiles: time it apart (every batch size once)
            started = time.perf_counter()
            for batch_size in args.batch_sizes:
                full_depth_seconds(backbones[option], texts[: 2 * batch_size], batch_size, system)
            warmup[option] = time.perf_counter() - started
    print(f"{len(texts)} held-out demo prompts, SmolLM2-135M full depth ({reference.backbone.num_layers} layers), "
          f"median of {args.repeats} interleaved repeats")  # fmt: skip
    for batch_size in args.batch_sizes:
        seconds: dict[str, list[float]] = {option: [] for option in options}
        for _ in range(args.repeats):
            for option in options:
                seconds[option].append(full_depth_seconds(backbones[option], texts, batch_size, system))
        base = statistics.median(seconds[REFERENCE])
        print(f"\nbatch size {batch_size}")
        print(f"{'option':<16}{'ms/request':>12}{'speedup':>9}{'spread':>16}{'warm-up s':>11}")
        for option in options:
            median = statistics.median(seconds[option])
            ratios = [base / s for s in seconds[option]]
            print(f"{option:<16}{1000 * median / len(texts):>12.1f}{base / median:>8.2f}x"
                  f"{min(ratios):>8.2f}-{max(ratios):.2f}x{warmup.get(option, 0.0):>11.0f}")  # fmt: skip

    if not args.auc:
        return
    print("\nAUC with heads trained on each option's own hidden states "
          f"({DEMO_CONFIG.train_requests} train / {DEMO_CONFIG.valid_requests} valid; "
          f"{DEMO_CONFIG.eval_requests} test requests, full depth)")  # fmt: skip
    full_auc: dict[str, float] = {}
    for option in options:
        experiment = Experiment(DEMO_CONFIG.replace(backbone_params=OPTIONS[option]), progress=False)
        experiment.fit_heads()
        result = experiment.run("never")
        full_auc[option] = result.metrics["auc"]
        line = f"{option:<16} AUC {full_auc[option]:.4f} ({full_auc[option] - full_auc[REFERENCE]:+.4f} vs fp32)"
        if option != REFERENCE or len(options) == 1:
            test = experiment.requests()
            test_texts, retrieved = experiment.prompts(test)
            features = experiment.extra_features(test, retrieved)
            labels = np.array([r.label for r in test])
            policy = experiment.make_policy("patience", {"patience": 2})
            engine = EarlyExitEngine(experiment.backbone, experiment.heads, policy, system=experiment.system)
            fp32_engine = EarlyExitEngine(reference.backbone, reference.heads, reference.make_policy("never"),
                                          system=system)  # fmt: skip
            if reference.train_report is None and reference.heads.trainable:
                reference.fit_heads()
            early, full = [], []
            for _ in range(args.repeats):  # interleaved: early exit on this option vs fp32 eager full depth
                started = time.perf_counter()
                predictions = engine.run(test_texts, batch_size=32, progress=False, features=features)
                early.append(time.perf_counter() - started)
                started = time.perf_counter()
                fp32_engine.run(test_texts, batch_size=32, progress=False, features=features)
                full.append(time.perf_counter() - started)
            combined = statistics.median(full) / statistics.median(early)
            line += (f"; patience 2: AUC {auc(labels, [p.prob for p in predictions]):.4f}, mean exit "
                     f"{np.mean([p.exit_layer for p in predictions]):.1f}, {combined:.2f}x vs fp32 eager full depth")
        print(line)


if __name__ == "__main__":
    main()
