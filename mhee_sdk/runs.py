"""Evaluate prepared policies of an :class:`~mhee_sdk.evaluation.Experiment` on labelled requests.

The requests are cut into batches; every batch runs each policy in turn (on this process or a Ray actor
pool), so the policies' engine times come from the same moments of the machine and their ratios to full
depth are fair. This process is the single store writer: each batch is logged as it arrives, in any
order, and each run's metrics are written once its last batch is in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mhee_sdk.config import RunConfig
from mhee_sdk.executors import Executor
from mhee_sdk.exits.policies import FULL_DEPTH
from mhee_sdk.interfaces import ExitPolicy
from mhee_sdk.metrics import run_metrics
from mhee_sdk.progress import progress_bar
from mhee_sdk.store import Store
from mhee_sdk.types import Prediction, Request, Retrieved
from mhee_sdk.workers import Chunk, PolicyChunks

if TYPE_CHECKING:
    from mhee_sdk.evaluation import Experiment

Prepared = tuple[RunConfig, str, ExitPolicy]  # the run's config as stored, its label, the policy object


@dataclass
class RunResult:
    """What one evaluated policy produced: metrics and counts; ``frame`` has one row per request."""

    label: str
    run_id: str | None
    predictions: list[Prediction] = field(repr=False)
    metrics: dict[str, float] = field(repr=False)
    seconds: float

    def __repr__(self) -> str:
        shown = [f"{len(self.predictions)} requests"]
        for key, text in (("auc", "AUC {:.3f}"), ("mean_exit_layer", "mean exit layer {:.1f}"),
                          ("layer_savings", "layer savings {:.2f}x"), ("speedup", "speedup {:.2f}x")):  # fmt: skip
            if key in self.metrics and np.isfinite(self.metrics[key]):
                shown.append(text.format(self.metrics[key]))
        return f"RunResult({self.label!r}, run_id={self.run_id!r}, {', '.join(shown)})"

    @property
    def frame(self) -> pd.DataFrame:
        """One row per request: id, P(like), exit layer, latency and the head outputs up to the exit."""
        return pd.DataFrame([asdict(p) for p in self.predictions])


def run_policies(
    experiment: Experiment,
    prepared: Sequence[Prepared],
    requests: Sequence[Request],
    executor: Executor,
    store: Store | None = None,
) -> list[RunResult]:
    """Run every prepared policy on `requests`, batch by batch in turn; one result per policy, in order.

    With full depth (``never``) among the policies, each result's metrics have ``speedup`` = full-depth
    engine time / its engine time, and the spread of the per-batch ratios (``speedup_p25``, ``speedup_p75``).
    """
    texts, retrieved = experiment.prompts(requests)
    features, prefix = experiment.extra_features(requests, retrieved), experiment.prefix(requests)
    size = experiment.config.batch_size
    chunks = [list(range(start, min(start + size, len(requests)))) for start in range(0, len(requests), size)]
    times = np.zeros((len(chunks), len(prepared)))  # [batches, policies] engine seconds
    predictions: list[dict[int, Prediction]] = [{} for _ in prepared]
    work = _chunk_work(experiment, executor, [policy for _, _, policy in prepared], requests, texts, chunks,
                       features, prefix)  # fmt: skip
    num_layers = experiment.backbone.num_layers
    with ExitStack() as stack:
        run_ids: list[str | None] = [None] * len(prepared)
        if store is not None:
            key = experiment.requests_key(requests)
            for j, (config, label, _) in enumerate(prepared):
                run_ids[j] = stack.enter_context(store.recording(
                    stored_config(experiment, config), experiment.heads.layers, num_layers, name=label,
                    requests_key=key))  # fmt: skip
        bar = stack.enter_context(progress_bar(total=len(requests) * len(prepared), enabled=experiment.progress,
                                               desc=f"evaluating {len(prepared)} policies"))  # fmt: skip
        results_in = stack.enter_context(closing(executor.map(*work)))  # closed (Ray stopped) on any error
        for b, done in results_in:  # any order on Ray; this process is the single store writer
            chunk = chunks[b]
            for j, out in enumerate(done.predictions):
                times[b, j] = done.seconds[j]
                predictions[j].update(zip(chunk, out, strict=True))
                if store is not None:
                    _log_batch(experiment, store, run_ids[j], chunk, out, requests, texts, retrieved)
            bar.update(len(chunk) * len(prepared))
        results = []
        full = next((j for j, (stored, _, _) in enumerate(prepared) if stored.policy == FULL_DEPTH), None)
        for j, (_, label, _) in enumerate(prepared):
            ordered = [predictions[j][i] for i in range(len(requests))]
            metrics = run_metrics(requests, ordered, num_layers, times[:, j],
                                  None if full is None else times[:, full])  # fmt: skip
            metrics.update(experiment.slice_metrics(requests, [p.prob for p in ordered]))
            if store is not None:
                store.add_metrics(run_ids[j], metrics)
                store.add_timing(run_ids[j], "engine", float(times[:, j].sum()), len(requests))
            results.append(RunResult(label, run_ids[j], ordered, metrics, float(times[:, j].sum())))
    return results


def stored_config(experiment: Experiment, config: RunConfig) -> dict[str, Any]:
    """The config a run stores, with what the backbone actually ran on (auto dtype/device resolved)."""
    backbone = experiment.backbone
    actual = {"name": backbone.name, "dtype": str(backbone.dtype).removeprefix("torch."),
              "device": str(backbone.device), "fingerprint": backbone.fingerprint}  # fmt: skip
    return {**config.to_dict(), "backbone_runtime": actual, "reproducible": config.reproducible}


def _chunk_work(experiment, executor, policies, requests, texts, chunks, features, prefix) -> tuple:
    """``(make_worker, items, shared)`` for `executor`: each item is one chunk of requests."""
    remote = not executor.in_process
    items = [Chunk(b, [texts[i] for i in chunk], [requests[i].request_id for i in chunk],
                   None if features is None else features[chunk],
                   None if prefix is None else (prefix[chunk].cpu() if remote else prefix[chunk]))
             for b, chunk in enumerate(chunks)]  # fmt: skip
    heads = copy.deepcopy(experiment.heads).cpu() if remote else experiment.heads  # workers may lack the driver's GPU
    backbone = experiment.backbone_spec() if remote else experiment.backbone
    return PolicyChunks(backbone, experiment.system), items, {"heads": heads, "policies": policies}


def _log_batch(
    experiment: Experiment,
    store: Store,
    run_id: str | None,
    chunk: list[int],
    out: Sequence[Prediction],
    requests: Sequence[Request],
    texts: Sequence[str],
    retrieved: Sequence[Sequence[Retrieved]],
) -> None:
    batch = [requests[i] for i in chunk]
    layers = experiment.heads.layers
    store.append_batch(run_id, {
        "predictions": pd.DataFrame({
            "request_id": [r.request_id for r in batch], "user": [r.user for r in batch],
            "item": [r.item for r in batch], "label": [r.label for r in batch], "prob": [p.prob for p in out],
            "exit_layer": [p.exit_layer for p in out], "latency_s": [p.latency_s for p in out]}),
        "layer_outputs": pd.DataFrame(
            [(p.request_id, layers[j], experiment.config.head, prob)
             for p in out for j, prob in enumerate(p.layer_probs)],
            columns=["request_id", "layer", "head", "prob"]),
        "requests": pd.DataFrame({
            "request_id": [r.request_id for r in batch], "prompt": [texts[i] for i in chunk],
            "retrieved": [json.dumps([asdict(x) for x in retrieved[i]]) for i in chunk]}),
    })  # fmt: skip
