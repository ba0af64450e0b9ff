"""`mhee demo`: the whole method on real data and the real model, in a few minutes on a laptop CPU.

MovieLens-100K, the GCN retriever (similar users' ratings of the candidate in the prompt), SmolLM2-135M
frozen, hybrid exit heads (hidden state + collaborative features) on every 3rd layer trained on the
train split, then the full-depth run, five early-exit policies and four classic baselines (the last,
collab-logistic, is the hybrid head's features without the LLM) on the same held-out test requests. Prints one table,
writes ``pareto.png`` and the DuckDB store. Hidden states of the training requests are cached, so a
second run skips that step.
"""

from __future__ import annotations

import time
from pathlib import Path

from mhee_sdk.adapters import adapter_dir
from mhee_sdk.backbones.hf import HFBackbone, auto_dtype
from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment, describe
from mhee_sdk.report import format_runs, format_slice_line, runs_table, write_plots
from mhee_sdk.store import Store

DEMO_CONFIG = RunConfig(
    name="demo",
    retriever="gcn",
    retriever_params={"mode": "users"},
    k=10,
    prompt_tokens=160,
    backbone="smollm2-135m",
    head="hybrid",
    head_params={"rank": 8},
    train_requests=500,
    valid_requests=250,
    eval_requests=200,
    batch_size=32,
)
DEMO_POLICIES = [
    ("fixed-layer", {"layer": 6}),
    ("max-prob", {"threshold": 0.75}),
    ("patience", {"patience": 2}),
    ("multi-head", {"ratio": 2.0, "window": 2}),
    ("calibrated", {"budget": 0.005}),
]
DEMO_BASELINES = ["popularity", "gcn-score", "logistic", "collab-logistic"]
DEMO_ADAPTER = "demo"
DATASET_NAMES = {"movielens-100k": "MovieLens-100K"}


def demo_backbone(requested: str | None = None) -> tuple[str, str]:
    """The demo's backbone and a line saying why: `requested`, else adapter 'demo' if it exists, else frozen."""
    if requested:
        return requested, f"using the backbone {requested!r} (--backbone)"
    folder = adapter_dir(DEMO_ADAPTER)
    if (folder / "adapter.json").is_file():
        return f"smollm2-135m+lora:{DEMO_ADAPTER}", f"using the fine-tuned adapter {folder} (made by `mhee finetune`)"
    return (
        "smollm2-135m",
        f"no fine-tuned adapter {DEMO_ADAPTER!r} found: using frozen SmolLM2-135M (`mhee finetune` makes one)",
    )


def run_demo(
    samples: int | None = None,
    out_dir: str | Path = "demo_out",
    backbone: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    config: RunConfig = DEMO_CONFIG,
    baseline_params: dict[str, dict] | None = None,
) -> Path:
    """Run the demo; returns the store path. `samples` overrides the number of test requests.

    `config` replaces the demo's (e.g. your own dataset, smaller sizes); `baseline_params` go to the baselines
    by name (``{"gcn-score": {"epochs": 5}}``).
    """
    name, why = demo_backbone(backbone)
    print(why)
    config = config.replace(eval_requests=samples or config.eval_requests, backbone=name, dtype=dtype, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"mhee demo: {DATASET_NAMES.get(config.dataset, config.dataset)}, "
        f"retriever={config.retriever}{config.retriever_params}, "
        f"backbone={config.backbone}, "
        f"{config.head} heads; {config.train_requests} train / {config.valid_requests} valid requests for the heads, "
        f"{config.eval_requests} test requests scored (batch {config.batch_size})",
        flush=True,
    )
    experiment = Experiment(config)
    line = f"backbone {describe(experiment.backbone)}"
    if config.dtype == "auto" and isinstance(experiment.backbone, HFBackbone):
        chosen, why = auto_dtype(experiment.backbone.device)
        line += f" (precision auto: {why})" if chosen == experiment.backbone.dtype else ""
    print(line, flush=True)
    report = experiment.fit_heads()
    if report is not None:
        best = max(report.valid_auc, key=report.valid_auc.get)
        print(f"heads trained: best valid AUC {report.valid_auc[best]:.3f} at layer {best}, "
              f"last layer {report.valid_auc[experiment.heads.layers[-1]]:.3f}", flush=True)  # fmt: skip
    store = Store.open(out / "mhee_runs.duckdb")
    # every policy runs batch by batch beside full depth: their speedups are measured side by side
    names = ["full depth"] + [""] * len(DEMO_POLICIES)
    runs = experiment.run_many([("never", {}), *DEMO_POLICIES], store=store, names=names)
    run_ids = [run.run_id for run in runs]
    for baseline in DEMO_BASELINES:
        run_ids.append(experiment.run_baseline(baseline, (baseline_params or {}).get(baseline), store=store).run_id)
    table = runs_table(store, run_ids)
    print()
    print(format_runs(table))
    print(format_slice_line(table, run_ids[0], "cold_items"))  # where text knowledge should beat collaboration
    paths = write_plots(store, table, out)
    print(f"\nwrote {paths[0]} and {store.path} in {time.perf_counter() - started:.0f} s")
    return store.path
