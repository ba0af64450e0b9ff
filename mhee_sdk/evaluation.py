"""Run a config end to end: data -> retriever -> prompts -> backbone + heads -> policy -> store.

[`Experiment`][mhee_sdk.evaluation.Experiment] builds the expensive parts once (fitted retriever, loaded
backbone, trained heads) so a notebook can evaluate many policies on the same requests;
[`evaluate`][mhee_sdk.evaluation.evaluate] is the one-call form.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from mhee_sdk.adapters import save_adapter
from mhee_sdk.baselines import platt
from mhee_sdk.config import RunConfig
from mhee_sdk.data.prompt import PromptBuilder
from mhee_sdk.engine import BatchResult, EarlyExitEngine
from mhee_sdk.exits.features import CollaborativeFeatures
from mhee_sdk.exits.heads import build_heads, check_head_output
from mhee_sdk.exits.policies import FULL_DEPTH
from mhee_sdk.finetune import (
    FinetuneConfig,
    FinetuneReport,
    finetune,
    forward_seconds,
    lora_weights,
    training_minutes,
)
from mhee_sdk.interfaces import (
    AdaptedBackbone,
    Backbone,
    Baseline,
    CalibratedPolicy,
    Dataset,
    ExitPolicy,
    Retriever,
    TrainableBackbone,
    require,
)
from mhee_sdk.metrics import quality, summarize
from mhee_sdk.registry import Registry, get_registry
from mhee_sdk.store import Store
from mhee_sdk.train import TrainConfig, TrainReport, collect_hidden, fit_heads
from mhee_sdk.types import Prediction, Request, Retrieved


@dataclass
class RunResult:
    """What one evaluated policy produced."""

    label: str
    run_id: str | None
    predictions: list[Prediction]
    metrics: dict[str, float]
    seconds: float


class Experiment:
    """The prepared pipeline of a [`RunConfig`][mhee_sdk.config.RunConfig]: evaluate many policies with `run`."""

    def __init__(
        self,
        config: RunConfig,
        registry: Registry | None = None,
        progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = config
        self.cache_dir = cache_dir  # hidden-state cache; default $MHEE_HOME/hidden
        self.registry = registry or get_registry()
        self.progress = progress
        create = self.registry.create
        self.dataset: Dataset = create("dataset", config.dataset, **config.dataset_params)
        require(self.dataset, Dataset, f"dataset {config.dataset!r}:")
        self.tables = self.dataset.load()
        self.retriever: Retriever = create("retriever", config.retriever, **config.retriever_params)
        require(self.retriever, Retriever, f"retriever {config.retriever!r}:")
        self.retriever.fit(self.tables.split("train"), self.dataset.log)
        self.backbone = self._build_backbone(config)
        self.builder = PromptBuilder(
            self.tables.users,
            self.tables.items,
            max_tokens=config.prompt_tokens,
            count_tokens=self.backbone.count_tokens,
        )
        self.heads = build_heads(
            config.head, self.backbone, config.exit_layers, self.registry, seed=config.seed, **config.head_params
        )
        self.collaborative = None
        if self.heads.needs_features or self.soft_tokens is not None:
            self.collaborative = CollaborativeFeatures().fit(
                self.tables.split("train"), self.dataset.log, self.retriever
            )
        self.train_report: TrainReport | None = None
        self._valid: tuple[np.ndarray, np.ndarray] | None = None
        self._full_depth_seconds: dict[str, float] = {}

    def _build_backbone(self, config: RunConfig) -> Backbone:
        backbone = self.registry.create("backbone", config.backbone, **config.backbone_params)
        require(backbone, Backbone, f"backbone {config.backbone!r}:")
        return backbone

    @property
    def system(self) -> str | None:
        """The chat system message of this task's prompts."""
        return self.builder.system_prompt

    @property
    def soft_tokens(self):
        """The collaborative soft tokens of the backbone's adapter, or None."""
        if isinstance(self.backbone, AdaptedBackbone) and self.backbone.adapter is not None:
            return self.backbone.adapter.soft_tokens
        return None

    # -------------------------------------------------------------- inputs
    def requests(self, split: str | None = None, limit: int | None = None) -> list[Request]:
        """Seeded sample of a split (default: the config's evaluation split and size)."""
        split = split or self.config.split
        return self.dataset.requests(split, limit=limit or self.config.eval_requests, seed=self.config.seed)

    def prompts(self, requests: Sequence[Request]) -> tuple[list[str], list[list[Retrieved]]]:
        """Retrieve evidence and build the prompt of each request."""
        retrieved = self.retriever.retrieve(requests, self.config.k)
        return self.builder.build_many(requests, retrieved), retrieved

    def extra_features(
        self, requests: Sequence[Request], retrieved: Sequence[Sequence[Retrieved]]
    ) -> np.ndarray | None:
        """Collaborative features ``[N, F]`` when the heads read them, else None."""
        return None if self.collaborative is None else self.collaborative.compute(requests, retrieved)

    def prefix(self, requests: Sequence[Request]) -> torch.Tensor | None:
        """Collaborative soft-token embeddings ``[N, S, H]`` when the backbone has them, else None."""
        soft = self.soft_tokens
        if soft is None:
            return None
        with torch.no_grad():  # the soft-token MLP is tiny: it runs on the CPU in float32
            vectors = torch.as_tensor(self.collaborative.embeddings(requests))
            return soft(vectors).to(device=self.backbone.device, dtype=self.backbone.dtype)

    def requests_key(self, requests: Sequence[Request]) -> str:
        """Identifies runs that are comparable (same requests, prompts, model, heads); only the policy differs."""
        c = self.config
        parts = [c.dataset, c.dataset_params, c.retriever, c.retriever_params, c.k, c.prompt_tokens,
                 self.backbone.fingerprint, c.head, c.head_params, self.heads.layers, c.seed,
                 [r.request_id for r in requests]]  # fmt: skip
        if self.system is not None:  # older keys (before the system message left the backbone) stay valid
            parts.append(self.system)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -------------------------------------------------------------- heads
    def features(self, split: str, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Cached pooled hidden states ``[N, L, H]``, labels, and collaborative features of a sample of `split`."""
        requests = self.dataset.requests(split, limit=limit, seed=self.config.seed)
        texts, retrieved = self.prompts(requests)
        hidden = collect_hidden(
            self.backbone, texts, self.heads.layers, cache_dir=self.cache_dir, progress=self.progress,
            prefix=self.prefix(requests), system=self.system,
        )  # fmt: skip
        return hidden, np.array([r.label for r in requests]), self.extra_features(requests, retrieved)

    def fit_heads(self, train_config: TrainConfig | None = None) -> TrainReport | None:
        """Train the heads on the train split, early-stopping on valid (no-op for untrained heads)."""
        if not self.heads.trainable:
            return None
        train_config = train_config or TrainConfig(seed=self.config.seed, progress=self.progress)
        x_train, y_train, f_train = self.features("train", self.config.train_requests)
        x_valid, y_valid, f_valid = self.features("valid", self.config.valid_requests)
        self.train_report = fit_heads(
            self.heads, x_train, y_train, x_valid, y_valid, self.backbone.num_layers, train_config, f_train, f_valid
        )
        self._valid = None
        return self.train_report

    def valid_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Head outputs ``[N, L]`` and labels on the validation sample (for calibrating policies)."""
        if self._valid is None:
            hidden, labels, extra = self.features("valid", self.config.valid_requests)
            device = self.backbone.device
            extra = None if extra is None else torch.as_tensor(extra, device=device)
            with torch.no_grad():
                columns = [
                    check_head_output(self.heads.predict(
                        layer, torch.as_tensor(np.asarray(hidden[:, j], np.float32), device=device), extra
                    ).double().cpu().numpy(), layer, self.heads.kind)
                    for j, layer in enumerate(self.heads.layers)
                ]  # fmt: skip
            self._valid = (np.stack(columns, axis=1), labels)
        return self._valid

    def make_policy(self, name: str, params: dict[str, Any] | None = None) -> ExitPolicy:
        """A registered policy; one that calibrates (and is not yet) is calibrated on the validation outputs."""
        policy = self.registry.create("exit_policy", name, **(params or {}))
        require(policy, ExitPolicy, f"exit policy {name!r}:")
        if isinstance(policy, CalibratedPolicy) and not policy.is_calibrated:
            probs, labels = self.valid_outputs()
            policy.calibrate(probs, labels, self.heads.layers)
        return policy

    def finetune(self, name: str, settings: FinetuneConfig | None = None) -> FinetuneReport:
        """Fine-tune (LoRA / soft tokens) on the train sample, save adapter `name`, re-fit the heads.

        Afterwards the experiment runs a fresh backbone built with the saved adapter (its name and
        fingerprint say so; ``config.backbone_params["adapter"]`` names it). ``settings.max_minutes``
        bounds the whole job: the training loop gets what is left after the frozen head fit and a timed
        estimate of the re-fit (new hidden states of train + valid).
        """
        started = time.perf_counter()
        if not isinstance(self.backbone, TrainableBackbone) or not isinstance(self.backbone, AdaptedBackbone):
            raise TypeError(f"backbone {self.backbone.name!r} cannot be fine-tuned (needs a torch model and adapters)")
        if self.backbone.adapter is not None:
            raise ValueError(f"backbone {self.backbone.name!r} already has an adapter; fine-tune its base model")
        settings = settings or FinetuneConfig(seed=self.config.seed, progress=self.progress)
        if self.heads.trainable and self.train_report is None:
            self.fit_heads()  # heads start from the frozen fit (and keep its standardization)
        requests = self.dataset.requests("train", limit=self.config.train_requests, seed=self.config.seed)
        texts, retrieved = self.prompts(requests)
        budget = settings.max_minutes
        if budget is not None:
            refit = 0.0  # untrained heads (verbalizer) need no re-fit
            if self.heads.trainable:
                rows = len(requests) + self.config.valid_requests
                per_request = forward_seconds(self.backbone, texts, self.heads.layers[-1], system=self.system)
                refit = 1.2 * rows * per_request / 60
            spent = (time.perf_counter() - started) / 60
            settings = replace(settings, max_minutes=training_minutes(budget, spent, refit))
        collab = None
        if settings.soft_tokens:
            if self.collaborative is None:
                self.collaborative = CollaborativeFeatures().fit(
                    self.tables.split("train"), self.dataset.log, self.retriever
                )
            collab = self.collaborative.embeddings(requests)
        labels = [r.label for r in requests]
        features = self.extra_features(requests, retrieved)
        report, soft = finetune(
            self.backbone, self.heads, texts, labels, settings, features, collab, system=self.system
        )
        record = {
            "base": self.backbone.fingerprint, "config": asdict(settings), "steps": report.steps,
            "minutes": report.minutes, "first_loss": report.first_loss,  # means over 20 steps: one batch is noise
            "last_loss": report.last_loss, "run_config": self.config.to_dict(), "train_requests": len(requests),
            "job_budget_minutes": budget,
        }  # fmt: skip
        save_adapter(name, lora_weights(self.backbone), soft, record)
        self.config = self.config.replace(backbone_params={**self.config.backbone_params, "adapter": name})
        self.backbone = self._build_backbone(self.config)  # the model above carries injected LoRA layers: start fresh
        self.heads.to(self.backbone.device)
        if self.collaborative is None and self.soft_tokens is not None:
            self.collaborative = CollaborativeFeatures().fit(
                self.tables.split("train"), self.dataset.log, self.retriever
            )
        self._valid = None
        self.fit_heads()
        return report

    # -------------------------------------------------------------- running
    def run(
        self,
        policy: str | None = None,
        params: dict[str, Any] | None = None,
        store: Store | None = None,
        requests: Sequence[Request] | None = None,
        name: str = "",
    ) -> RunResult:
        """Evaluate one policy on the evaluation requests; logs to `store` when given."""
        name_ = policy or self.config.policy
        params = dict(self.config.policy_params if policy is None else (params or {}))
        config = self.config.replace(policy=name_, policy_params=params, name=name or "")
        policy_obj = self.make_policy(name_, params)
        if isinstance(policy_obj, CalibratedPolicy):  # the stored config rebuilds the calibrated policy
            config.policy_params = {**params, **policy_obj.calibrated_params()}
        requests = list(requests) if requests is not None else self.requests()
        texts, retrieved = self.prompts(requests)
        key = self.requests_key(requests)
        engine = EarlyExitEngine(self.backbone, self.heads, policy_obj, system=self.system)
        inputs = {"features": self.extra_features(requests, retrieved), "prefix": self.prefix(requests)}
        seconds = 0.0

        def log_batch(batch: BatchResult) -> None:
            nonlocal seconds
            seconds += batch.seconds
            if store is not None:
                self._log_batch(store, run_id, batch, requests, texts, retrieved)

        run_id = None
        if store is None:
            predictions = self._run_engine(engine, texts, requests, inputs, log_batch)
            metrics = self._metrics(requests, predictions, seconds, key, name_, None)
        else:
            with store.recording(config.to_dict(), self.heads.layers, self.backbone.num_layers,
                                 name=config.label, requests_key=key) as run_id:  # fmt: skip
                predictions = self._run_engine(engine, texts, requests, inputs, log_batch)
                metrics = self._metrics(requests, predictions, seconds, key, name_, store)
                store.add_metrics(run_id, metrics)
                store.add_timing(run_id, "engine", seconds, len(requests))
        return RunResult(config.label, run_id, predictions, metrics, seconds)

    def _run_engine(self, engine, texts, requests, inputs, on_batch) -> list[Prediction]:
        return engine.run(
            texts, [r.request_id for r in requests], batch_size=self.config.batch_size, progress=self.progress,
            on_batch=on_batch, **inputs,
        )  # fmt: skip

    def _log_batch(self, store, run_id, result: BatchResult, requests, texts, retrieved) -> None:
        batch, out = [requests[i] for i in result.positions], result.predictions
        texts, retrieved = [texts[i] for i in result.positions], [retrieved[i] for i in result.positions]
        store.append(run_id, "predictions", pd.DataFrame({
            "request_id": [r.request_id for r in batch], "user": [r.user for r in batch],
            "item": [r.item for r in batch], "label": [r.label for r in batch], "prob": [p.prob for p in out],
            "exit_layer": [p.exit_layer for p in out], "latency_s": [p.latency_s for p in out]}))  # fmt: skip
        layers = self.heads.layers
        store.append(run_id, "layer_outputs", pd.DataFrame(
            [(p.request_id, layers[j], self.config.head, prob) for p in out for j, prob in enumerate(p.layer_probs)],
            columns=["request_id", "layer", "head", "prob"]))  # fmt: skip
        store.append(run_id, "requests", pd.DataFrame({
            "request_id": [r.request_id for r in batch], "prompt": list(texts),
            "retrieved": [json.dumps([asdict(x) for x in found]) for found in retrieved]}))  # fmt: skip

    def _metrics(self, requests, predictions, seconds, key, policy_name, store) -> dict[str, float]:
        metrics = summarize(
            [r.label for r in requests], [p.prob for p in predictions], [r.user for r in requests],
            [p.exit_layer for p in predictions], self.backbone.num_layers,
        )  # fmt: skip
        metrics["seconds"] = seconds
        metrics["requests_per_s"] = len(requests) / seconds
        if policy_name == FULL_DEPTH:
            self._full_depth_seconds[key] = seconds
        full = self._full_depth_seconds.get(key)
        if full is None and store is not None:
            found = store.full_depth_runs(key, same_requests_only=True)
            full = store.engine_seconds(found[0]) if found else None
        if full is not None:
            metrics["speedup"] = full / seconds
        return metrics

    def run_baseline(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        store: Store | None = None,
        requests: Sequence[Request] | None = None,
    ) -> RunResult:
        """Score a registered classic baseline on the same requests (Platt-calibrated on validation)."""
        entry, implied = self.registry.get("baseline", name)
        params = dict(params or {})
        accepted = inspect.signature(entry.factory).parameters
        # what an experiment can hand a baseline; each gets the ones its factory accepts
        c = self.config
        offered = {"users": self.tables.users, "items": self.tables.items, "retriever": self.retriever,
                   "train_requests": c.train_requests, "k": c.k, "seed": c.seed}  # fmt: skip
        extras = {k: v for k, v in offered.items() if k in accepted and k not in params}
        baseline = entry.factory(**implied, **extras, **params)
        require(baseline, Baseline, f"baseline {name!r}:")
        started = time.perf_counter()
        baseline.fit(self.tables.split("train"), self.dataset.log)
        valid = self.dataset.requests("valid", limit=self.config.valid_requests, seed=self.config.seed)
        calibrate = platt(baseline.score(valid), [r.label for r in valid])
        requests = list(requests) if requests is not None else self.requests()
        probs = calibrate(baseline.score(requests))
        seconds = time.perf_counter() - started
        metrics = quality([r.label for r in requests], probs, [r.user for r in requests])
        predictions = [Prediction(r.request_id, float(p), 0, (), 0.0) for r, p in zip(requests, probs, strict=True)]
        run_id = None
        if store is not None:
            config = {"baseline": name, "baseline_params": params, "dataset": self.config.dataset,
                      "split": self.config.split, "seed": self.config.seed}  # fmt: skip
            with store.recording(config, [], 0, name=name, kind="baseline",
                                 requests_key=self.requests_key(requests)) as run_id:  # fmt: skip
                store.append(run_id, "predictions", pd.DataFrame({
                    "request_id": [r.request_id for r in requests], "user": [r.user for r in requests],
                    "item": [r.item for r in requests], "label": [r.label for r in requests], "prob": probs,
                    "exit_layer": 0, "latency_s": seconds / len(requests)}))  # fmt: skip
                store.add_metrics(run_id, metrics)
                store.add_timing(run_id, "fit+score", seconds, len(requests))
        return RunResult(name, run_id, predictions, metrics, seconds)


def evaluate(config: RunConfig | dict[str, Any], store: Store | None = None, progress: bool = True) -> RunResult:
    """Prepare `config`, train its heads, and evaluate its policy (one call; see Experiment for many policies)."""
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    experiment = Experiment(config, progress=progress)
    experiment.fit_heads()
    return experiment.run(store=store)
