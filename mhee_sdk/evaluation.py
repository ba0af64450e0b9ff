"""Run a config end to end: data -> retriever -> prompts -> backbone + heads -> policy -> store.

An :class:`Experiment` builds its pieces lazily (the dataset, the fitted retriever, the backbone and
the heads are made when first needed, each announced), so constructing one is instant and a notebook
can evaluate many policies on the same requests. :meth:`Experiment.run_many` runs several policies
batch by batch, interleaved, so their speedups over full depth come from the same moments of the
machine; :func:`evaluate` is the one-call form.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mhee_sdk.config import RunConfig
from mhee_sdk.data.prompt import PromptBuilder, PromptTemplate
from mhee_sdk.data.split import RequestSlices
from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.executors import Executor, executor_for
from mhee_sdk.exits.features import CollaborativeFeatures
from mhee_sdk.exits.heads import ExitHeads, build_heads, check_head_output, load_heads, save_heads
from mhee_sdk.interfaces import (
    AdaptedBackbone,
    Backbone,
    CalibratedPolicy,
    Dataset,
    ExitPolicy,
    Retriever,
    TemplatedDataset,
    require,
)
from mhee_sdk.metrics import sliced_quality
from mhee_sdk.registry import Registry, get_registry
from mhee_sdk.runs import RunResult, run_policies
from mhee_sdk.store import Store
from mhee_sdk.train import TrainConfig, TrainReport, collect_hidden, fit_heads
from mhee_sdk.types import Request, Retrieved
from mhee_sdk.validation import check_config
from mhee_sdk.workers import BackboneSpec

PolicySpec = str | tuple[str, dict[str, Any]] | ExitPolicy


def describe(backbone: Backbone) -> str:
    """What the backbone is and runs on, in one line."""
    precision = str(backbone.dtype).removeprefix("torch.")
    return f"{backbone.name}: {backbone.num_layers} layers, {precision} on {backbone.device}"


class Experiment:
    """The pipeline of a run config, built lazily; evaluate any number of policies with :meth:`run`.

    Args:
        config: a ``RunConfig``, a dict, a TOML file path, or None for the defaults.
        registry: where plugins are looked up (default: the process-wide one).
        progress: announce each heavy step and show progress bars (False: silent).
        cache_dir: hidden-state cache (default ``$MHEE_HOME/hidden``).
        **overrides: config fields, e.g. ``Experiment(backbone="tiny", eval_requests=50)``.
    """

    def __init__(
        self,
        config: RunConfig | dict[str, Any] | str | os.PathLike | None = None,
        registry: Registry | None = None,
        progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> None:
        self.config = RunConfig.coerce(config).replace(**overrides) if overrides else RunConfig.coerce(config)
        self.registry = registry or get_registry()
        check_config(self.config, self.registry)  # every problem at once, before any data or model loads
        self.progress = progress
        self.cache_dir = cache_dir
        self.train_report: TrainReport | None = None
        self._heads_ready = False  # trained, loaded, or needing no training
        self._valid: tuple[np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        c = self.config
        built = [name for name in ("tables", "retriever", "backbone", "heads") if name in self.__dict__]
        state = "heads trained" if self._heads_ready else "heads not trained yet"
        return (f"Experiment(dataset={c.dataset!r}, retriever={c.retriever!r}, backbone={c.backbone!r}, "
                f"head={c.head!r}, eval={c.eval_requests} {c.split} requests; built: {', '.join(built) or 'nothing'};"
                f" {state})")  # fmt: skip

    def _say(self, message: str) -> None:
        if self.progress:
            print(f"mhee: {message}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- the pieces, built when first needed
    @cached_property
    def dataset(self) -> Dataset:
        """The dataset (registry name ``config.dataset``)."""
        dataset = self.registry.create("dataset", self.config.dataset, **self.config.dataset_params)
        require(dataset, Dataset, f"dataset {self.config.dataset!r}:")
        return dataset

    @cached_property
    def tables(self):
        """The dataset's interactions, users and items."""
        self._say(f"loading dataset {self.config.dataset}")
        return self.dataset.load()

    @cached_property
    def slices(self) -> RequestSlices:
        """Which requests count as cold / light / heavy: decided by the training split, once."""
        return RequestSlices.from_train(self.tables.split("train"), self.config.cold_threshold)

    @cached_property
    def template(self) -> PromptTemplate:
        """The dataset's prompt template (or the generic one) with the config's `prompt` overrides."""
        base = self.dataset.prompt_template if isinstance(self.dataset, TemplatedDataset) else PromptTemplate()
        return base.with_overrides(self.config.prompt)

    @cached_property
    def retriever(self) -> Retriever:
        """The retriever, fitted on the train split."""
        retriever = self.registry.create("retriever", self.config.retriever, **self.config.retriever_params)
        require(retriever, Retriever, f"retriever {self.config.retriever!r}:")
        train = self.tables.split("train")
        self._say(f"fitting retriever {self.config.retriever} on {len(train):,} train interactions")
        retriever.fit(train, self.dataset.log)
        return retriever

    @cached_property
    def backbone(self) -> Backbone:
        """The backbone (registry name ``config.backbone``, with dtype/device unless left on auto)."""
        self._say(f"loading backbone {self.config.backbone}")
        return self._build_backbone(self.config)

    def _build_backbone(self, config: RunConfig) -> Backbone:
        backbone = self.registry.create("backbone", config.backbone, **config.backbone_options())
        require(backbone, Backbone, f"backbone {config.backbone!r}:")
        return backbone

    @cached_property
    def builder(self) -> PromptBuilder:
        """Writes each request's prompt within the token budget."""
        return PromptBuilder(self.tables.users, self.tables.items, max_tokens=self.config.prompt_tokens,
                             count_tokens=self.backbone.count_tokens, template=self.template)  # fmt: skip

    @cached_property
    def heads(self) -> ExitHeads:
        """The exit heads (untrained until :meth:`fit_heads` or :meth:`load_heads`)."""
        c = self.config
        params = dict(c.head_params)
        entry, _ = self.registry.get("exit_head", c.head)
        if "words" in inspect.signature(entry.factory).parameters:  # heads that read the LM's answer words
            params.setdefault("words", (self.template.yes, self.template.no))
        heads = build_heads(c.head, self.backbone, c.exit_layers, self.registry, seed=c.seed, **params)
        self._heads_ready = not heads.trainable
        return heads

    @cached_property
    def collaborative(self) -> CollaborativeFeatures | None:
        """Collaborative features for heads that read them (or soft tokens), else None."""
        if not self.heads.needs_features and self.soft_tokens is None:
            return None
        return CollaborativeFeatures().fit(self.tables.split("train"), self.dataset.log, self.retriever)

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
        parts = [c.dataset, c.describe("dataset_params"), c.retriever, c.describe("retriever_params"), c.k,
                 c.prompt_tokens, self.backbone.fingerprint, c.head, c.head_params, self.heads.layers, c.seed,
                 [r.request_id for r in requests]]  # fmt: skip
        if self.system is not None:  # older keys (before the system message left the backbone) stay valid
            parts.append(self.system)
        if c.prompt:  # likewise keys from before prompt overrides existed
            parts.append(c.prompt)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check_requests(self, requests: Sequence[Request], labelled: bool) -> list[Request]:
        """Requests as a list, checked: unique ids, labels 0/1 when `labelled`, users and items the dataset knows.

        Unknown users or items are an error for labelled evaluation (a typo would otherwise run silently
        with no history); for `predict` they are allowed (new traffic), and reported once.
        """
        requests = list(requests)
        ids = [r.request_id for r in requests]
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"request ids must be unique; repeated: {repeated[:5]}")
        if labelled and (bad := [r.request_id for r in requests if r.label not in (0, 1)]):
            raise ValueError(f"requests {bad[:5]} have labels outside {{0, 1}}; use predict() for unlabeled requests")
        users, items = set(self.tables.users["user"]), set(self.tables.items["item"])
        unknown = [r for r in requests if r.user not in users or r.item not in items]
        if unknown and labelled:
            raise ValueError(
                f"{len(unknown)} requests name users or items the dataset {self.config.dataset!r} does not have "
                f"(first: request {unknown[0].request_id}, user {unknown[0].user}, item {unknown[0].item})"
            )
        if unknown:
            self._say(f"{len(unknown)} of {len(requests)} requests have a user or item the dataset has not seen: "
                      "they get no history and an unknown profile")  # fmt: skip
        return requests

    # -------------------------------------------------------------- heads
    def features(self, split: str, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Cached pooled hidden states ``[N, L, H]``, labels, and collaborative features of a sample of `split`."""
        requests = self.dataset.requests(split, limit=limit, seed=self.config.seed)
        texts, retrieved = self.prompts(requests)
        hidden = collect_hidden(
            self.backbone, texts, self.heads.layers, cache_dir=self.cache_dir, progress=self.progress,
            prefix=self.prefix(requests), system=self.system, executor=self.executor(),
            backbone_spec=self.backbone_spec(),
        )  # fmt: skip
        return hidden, np.array([r.label for r in requests]), self.extra_features(requests, retrieved)

    def fit_heads(self, train_config: TrainConfig | None = None) -> TrainReport | None:
        """Train the heads on the train split, early-stopping on valid (no-op for untrained heads)."""
        if not self.heads.trainable:
            return None
        train_config = train_config or TrainConfig(seed=self.config.seed, progress=self.progress)
        self._say(f"training {self.config.head} heads on {self.config.train_requests} train requests")
        x_train, y_train, f_train = self.features("train", self.config.train_requests)
        x_valid, y_valid, f_valid = self.features("valid", self.config.valid_requests)
        self.train_report = fit_heads(
            self.heads, x_train, y_train, x_valid, y_valid, self.backbone.num_layers, train_config, f_train, f_valid
        )
        self._heads_ready, self._valid = True, None
        return self.train_report

    def _ensure_heads(self) -> None:
        if not self._heads_ready and self.heads.trainable:  # the heavy step, when first needed
            self.fit_heads()

    def save_heads(self, path: str | os.PathLike) -> Path:
        """Save the trained heads with what they were trained on (backbone fingerprint, kind, layers)."""
        self._ensure_heads()
        valid_auc = None if self.train_report is None else self.train_report.valid_auc
        return save_heads(self.heads, path, self.backbone.fingerprint, self.config.head_params, valid_auc)

    def load_heads(self, path: str | os.PathLike) -> None:
        """Load heads saved by :meth:`save_heads`; they must come from this backbone (same fingerprint)."""
        heads, head_params = load_heads(path, self.backbone, self.registry)
        self.__dict__["heads"] = heads
        self.config = self.config.replace(head=heads.kind, exit_layers=list(heads.layers), head_params=head_params)
        self._heads_ready, self._valid = True, None

    def valid_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Head outputs ``[N, L]`` and labels on the validation sample (for calibrating policies)."""
        if self._valid is None:
            self._ensure_heads()
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

    def make_policy(self, name: str | ExitPolicy, params: dict[str, Any] | None = None, **kwargs: Any) -> ExitPolicy:
        """A policy by name and parameters (or an object, used as is); one that calibrates is calibrated on valid."""
        policy = self._build_policy(name, {**(params or {}), **kwargs})
        if isinstance(policy, CalibratedPolicy) and not policy.is_calibrated:
            probs, labels = self.valid_outputs()
            policy.calibrate(probs, labels, self.heads.layers)
        return policy

    def _build_policy(self, name: str | ExitPolicy, params: dict[str, Any]) -> ExitPolicy:
        """The policy object, not calibrated yet: cheap, so bad names and parameters fail before any work."""
        if isinstance(name, str):
            policy = self.registry.create("exit_policy", name, **params)
        elif params:
            raise ValueError(f"parameters {sorted(params)} go with a policy name, not an object")
        else:
            policy = name
        require(policy, ExitPolicy, f"exit policy {name!r}:")
        return policy

    def use_adapter(self, name: str) -> None:
        """Run from now on a freshly loaded backbone with saved adapter `name` (heads kept: re-fit them)."""
        self.config = self.config.replace(backbone_params={**self.config.backbone_params, "adapter": name})
        for built in ("backbone", "builder", "collaborative"):
            self.__dict__.pop(built, None)
        self.heads.to(self.backbone.device)
        self._heads_ready, self._valid = not self.heads.trainable, None

    def finetune(self, name: str, settings=None):
        """Fine-tune (LoRA / soft tokens), save adapter `name`, re-fit the heads; see ``mhee_sdk.finetune``."""
        from mhee_sdk.finetune import finetune_experiment

        return finetune_experiment(self, name, settings)

    # -------------------------------------------------------------- running
    def run(
        self,
        policy: str | ExitPolicy | None = None,
        params: dict[str, Any] | None = None,
        *,
        store: Store | None = None,
        requests: Sequence[Request] | None = None,
        name: str = "",
        **policy_params: Any,
    ) -> RunResult:
        """Evaluate one policy on the evaluation requests; logs to `store` when given.

        ``run("max-prob", threshold=0.7)`` or ``run("max-prob", {"threshold": 0.7})``; default: the config's.
        A speedup is reported only by :meth:`run_many` with full depth among the policies (measured interleaved).
        """
        if policy is None:
            policy, params = self.config.policy, {**self.config.policy_params, **(params or {})}
        spec = policy if not isinstance(policy, str) else (policy, {**(params or {}), **policy_params})
        return self.run_many([spec], store=store, requests=requests, names=[name])[0]

    def run_many(
        self,
        policies: Sequence[PolicySpec],
        store: Store | None = None,
        requests: Sequence[Request] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[RunResult]:
        """Evaluate several policies on the same requests, batch by batch in rotating order.

        Each policy's engine time is the sum of its batches; with full depth (``never``) among the
        policies, each gets ``speedup`` = full-depth time / its time, and the spread of the per-batch
        ratios (``speedup_p25``, ``speedup_p75``): measured side by side, not a lone wall-clock pair.
        """
        for spec in policies:  # names and parameters checked before the heads are trained (minutes on a real model)
            self._check_policy(spec)
        executor = self.executor()  # likewise a missing ray extra
        self._ensure_heads()
        prepared = [self._prepare(spec, label) for spec, label in zip(policies, names or [""] * len(policies),
                                                                     strict=True)]  # fmt: skip
        requests = self.check_requests(requests if requests is not None else self.requests(), labelled=True)
        return run_policies(self, prepared, requests, executor, store)

    def executor(self) -> Executor:
        """Where batches run: this process, or a Ray actor pool (the config's ``executor`` and its settings)."""
        return executor_for(self.config)

    def backbone_spec(self) -> BackboneSpec:
        """How a worker process rebuilds this backbone: registry name, options, and the fingerprint to match."""
        return BackboneSpec(self.config.backbone, self.config.backbone_options(), self.backbone.fingerprint)

    def _check_policy(self, spec: PolicySpec) -> None:
        """Build `spec`'s policy, uncalibrated: cheap, so a bad name or parameter fails before any heavy work."""
        self._build_policy(*((spec, {}) if isinstance(spec, str | ExitPolicy) else spec))

    def _prepare(self, spec: PolicySpec, name: str) -> tuple[RunConfig, str, ExitPolicy]:
        """The run's config (policy and parameters as stored), its label, and the policy object."""
        if isinstance(spec, str):
            spec = (spec, {})
        if isinstance(spec, tuple):
            policy_name, params = spec
            policy = self.make_policy(policy_name, params)
        else:
            policy, policy_name, params = self.make_policy(spec), spec.name, {"object": repr(spec)}
        if isinstance(policy, CalibratedPolicy):  # the stored config rebuilds the calibrated policy
            params = {**params, **policy.calibrated_params()}
        config = self.config.replace(policy=policy_name, policy_params=params, name=name or "")
        return config, config.label, policy

    def predict(self, requests: Sequence[Request] | pd.DataFrame, policy: PolicySpec | None = None) -> pd.DataFrame:
        """P(like) and exit layer for requests without labels (new traffic): a DataFrame, one row per request.

        `requests`: Request objects, or a DataFrame with ``user, item, ts`` (ids as in the dataset) and
        optionally ``request_id``. The policy defaults to the config's.
        """
        if isinstance(requests, pd.DataFrame):
            missing = {"user", "item", "ts"} - set(requests.columns)
            if missing:
                raise ValueError(f"predict() needs the columns user, item, ts; missing {sorted(missing)}")
            ids = requests["request_id"] if "request_id" in requests else range(len(requests))
            requests = [Request(int(i), int(u), int(it), -1, int(t))
                        for i, u, it, t in zip(ids, requests["user"], requests["item"], requests["ts"], strict=True)]
        requests = self.check_requests(requests, labelled=False)
        engine = self.engine(policy)
        texts, retrieved = self.prompts(requests)
        out = engine.run(texts, [r.request_id for r in requests], batch_size=self.config.batch_size,
                         progress=self.progress, features=self.extra_features(requests, retrieved),
                         prefix=self.prefix(requests))  # fmt: skip
        return pd.DataFrame({"request_id": [r.request_id for r in requests], "user": [r.user for r in requests],
                             "item": [r.item for r in requests], "ts": [r.ts for r in requests],
                             "prob": [p.prob for p in out], "exit_layer": [p.exit_layer for p in out],
                             "latency_s": [p.latency_s for p in out]})  # fmt: skip

    def engine(self, policy: PolicySpec | None = None) -> EarlyExitEngine:
        """The early-exit engine this experiment's runs use: its backbone, trained heads, and system message.

        For scripts that drive ``EarlyExitEngine.run`` themselves (benchmarks): an engine built by hand
        without ``system=`` would feed prompts unlike those the heads were trained on. The policy defaults
        to the config's; pass features and soft tokens to ``run`` (``extra_features``, ``prefix``).
        """
        spec = policy or (self.config.policy, self.config.policy_params)
        self._check_policy(spec)  # a bad name fails before the heads are trained
        self._ensure_heads()
        _, _, policy_obj = self._prepare(spec, "")
        return EarlyExitEngine(self.backbone, self.heads, policy_obj, system=self.system)

    def slice_metrics(self, requests: Sequence[Request], probs: Sequence[float]) -> dict[str, float]:
        """Quality on the cold-start and activity slices (``auc@cold_items`` ...) plus the slices' cut points."""
        masks = self.slices.masks(requests)
        found = sliced_quality([r.label for r in requests], probs, [r.user for r in requests], masks)
        return {**found, **self.slices.cut_points()}

    def run_baseline(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        store: Store | None = None,
        requests: Sequence[Request] | None = None,
        **kwargs: Any,
    ) -> RunResult:
        """Score a registered classic baseline on the same requests (Platt-calibrated on validation)."""
        from mhee_sdk.baselines import score_baseline

        requests = list(requests) if requests is not None else self.requests()
        return score_baseline(self, name, {**(params or {}), **kwargs}, store, requests)


def evaluate(config: RunConfig | dict[str, Any] | str | os.PathLike, store: Store | None = None,
             progress: bool = True) -> RunResult:  # fmt: skip
    """Prepare `config`, train its heads, and evaluate its policy (one call; see Experiment for many policies)."""
    experiment = Experiment(config, progress=progress)
    return experiment.run(store=store, name=experiment.config.name)
