"""`mhee demo`: the whole method on real data and the real model on a laptop CPU (README: measured time).

MovieLens-100K, the GCN retriever (similar users' ratings of the candidate in the prompt), SmolLM2-135M
frozen, hybrid exit heads (hidden state + collaborative features) on every 3rd layer trained on the
train split, then the full-depth run, five early-exit policies and four classic baselines (the last,
collab-logistic, is the hybrid head's features without the LLM) on the same held-out test requests. Prints one table,
writes ``pareto.png`` and the DuckDB store. Hidden states of the training requests are cached, so a
second run skips that step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mhee_sdk.adapters import adapter_dir
from mhee_sdk.backbones.hf import HFBackbone, auto_dtype
from mhee_sdk.config import RunConfig
from mhee_sdk.data.prompt import approx_tokens
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


@dataclass(frozen=True)
class DemoResult:
    """What the demo recorded: the store, its runs in table order, the plot files, and notes on the settings."""

    store: Path
    run_ids: list[str]
    plots: list[Path]
    notes: list[str] = field(default_factory=list)


PROMPT_SAMPLE = (
    "User: 24-year-old male technician.\nThe user's earlier ratings (1-5):\n"
    "- Toy Story (1995; Animation, Children's, Comedy): 5\nRatings of the candidate by similar users:\n"
    "- 31-year-old female writer: 4\nCandidate: GoldenEye (1995; Action, Adventure, Thriller)\n"
    "Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No."
)


def demo_prompt_tokens(backbone: str) -> tuple[int, str]:
    """The demo's prompt budget for `backbone` and a line saying how it was chosen.

    ``DEMO_CONFIG.prompt_tokens`` is a budget in SmolLM2's tokens. Other tokenizers split the same text
    into more or fewer tokens (the tiny test backbone counts bytes), so the budget is scaled to hold the
    same text, measured on a sample prompt with the backbone's own counter. That builds the backbone once
    more; pass ``prompt_tokens`` to skip it.
    """
    budget = DEMO_CONFIG.prompt_tokens
    if backbone.startswith("smollm2-135m"):
        return budget, f"prompt budget {budget} tokens"
    from mhee_sdk.registry import get_registry

    counted = get_registry().create("backbone", backbone).count_tokens(PROMPT_SAMPLE)
    scaled = max(budget, math.ceil(budget * counted / approx_tokens(PROMPT_SAMPLE)))
    return scaled, f"prompt budget {scaled} tokens of {backbone!r} (the text {budget} SmolLM2 tokens hold)"


def run_demo(
    samples: int | None = None,
    out_dir: str | Path = "demo_out",
    backbone: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    config: RunConfig = DEMO_CONFIG,
    baseline_params: dict[str, dict] | None = None,
    *,
    prompt_tokens: int | None = None,
    train_requests: int | None = None,
    valid_requests: int | None = None,
    log: Callable[[str], None] | None = print,
    show: Callable[[str], None] | None = print,
    progress: bool = True,
) -> DemoResult:
    """Run the demo. `samples` overrides the number of test requests, `prompt_tokens` the prompt budget
    (default: :func:`demo_prompt_tokens`), `train_requests` / `valid_requests` the head-training samples.

    `config` replaces the demo's (e.g. your own dataset, smaller sizes); `baseline_params` go to the baselines
    by name (``{"gcn-score": {"epochs": 5}}``). `log` receives the narrative lines, `show` the final table
    (None: silent).
    """
    say = log or (lambda line: None)
    name, why = demo_backbone(backbone)
    say(why)
    if prompt_tokens:
        budget, budget_why = prompt_tokens, f"prompt budget {prompt_tokens} tokens (given)"
    elif config.prompt_tokens != DEMO_CONFIG.prompt_tokens:
        budget, budget_why = config.prompt_tokens, f"prompt budget {config.prompt_tokens} tokens (the config's)"
    else:
        budget, budget_why = demo_prompt_tokens(name)
    config = config.replace(
        eval_requests=samples or config.eval_requests, backbone=name, dtype=dtype, device=device,
        prompt_tokens=budget, train_requests=train_requests or config.train_requests,
        valid_requests=valid_requests or config.valid_requests,
    )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say(
        f"mhee demo: {DATASET_NAMES.get(config.dataset, config.dataset)}, "
        f"retriever={config.retriever}{config.retriever_params}, "
        f"backbone={config.backbone}, {budget_why}, "
        f"{config.head} heads; {config.train_requests} train / {config.valid_requests} valid requests for the heads, "
        f"{config.eval_requests} test requests scored (batch {config.batch_size})"
    )
    experiment = Experiment(config, progress=progress)
    line = f"backbone {describe(experiment.backbone)}"
    if config.dtype == "auto" and isinstance(experiment.backbone, HFBackbone):
        chosen, why = auto_dtype(experiment.backbone.device)
        line += f" (precision auto: {why})" if chosen == experiment.backbone.dtype else ""
    say(line)
    notes = []
    requests = experiment.requests()
    if len(requests) < config.eval_requests:
        notes.append(f"the test split has {len(requests)} requests: --samples {config.eval_requests} was clamped")
        say(f"Note: {notes[-1]}")
    report = experiment.fit_heads()
    if report is not None:
        best = max(report.valid_auc, key=report.valid_auc.get)
        say(f"heads trained: best valid AUC {report.valid_auc[best]:.3f} at layer {best}, "
            f"last layer {report.valid_auc[experiment.heads.layers[-1]]:.3f}")  # fmt: skip
    store = Store.open(out / "mhee_runs.duckdb")
    # every policy runs batch by batch beside full depth: their speedups are measured side by side
    names = ["full depth"] + [""] * len(DEMO_POLICIES)
    runs = experiment.run_many([("never", {}), *DEMO_POLICIES], store=store, requests=requests, names=names)
    run_ids = [run.run_id for run in runs]
    for baseline in DEMO_BASELINES:
        params = (baseline_params or {}).get(baseline)
        run_ids.append(experiment.run_baseline(baseline, params, store=store, requests=requests).run_id)
    table = runs_table(store, run_ids)
    if show is not None:
        show("")
        show(format_runs(table))
        show(format_slice_line(table, run_ids[0], "cold_items"))  # where text knowledge should beat collaboration
    paths = write_plots(store, table, out)
    say(f"\nwrote {paths[0]} and {store.path} in {time.perf_counter() - started:.0f} s")
    return DemoResult(store.path, run_ids, paths, notes)
