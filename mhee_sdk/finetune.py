"""Fine-tune the backbone for the exit heads: LoRA adapters and/or collaborative soft tokens.

The loss is the exit heads' joint loss (weighted per-layer BCE) with depth-aware learning rates:
LoRA weights in decoder layer i and the head on exit layer i both train faster the shallower i is.
Collaborative soft tokens (as in CoLLM) map the GCN user fold-in and item embeddings through a small
MLP into `count` extra input embeddings placed before the prompt.

The result is an adapter (``mhee_sdk.adapters``) saved under ``$MHEE_HOME/adapters/<name>/`` and
loaded by name as the backbone parameter ``adapter = "<name>"`` (or the backbone ``smollm2-135m+lora:<name>``).
Heads are then re-fitted on the adapted model's cached hidden states.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mhee_sdk.adapters import SoftTokens, save_adapter
from mhee_sdk.exits.heads import ExitHeads
from mhee_sdk.interfaces import AdaptedBackbone, Backbone, TrainableBackbone
from mhee_sdk.loop import LayerLoop
from mhee_sdk.progress import progress_bar
from mhee_sdk.train import depth_lr

if TYPE_CHECKING:
    from mhee_sdk.evaluation import Experiment


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; the defaults finish in under an hour on 2 CPU cores (see bench/RESULTS.md).

    ``max_minutes`` bounds [`finetune`][mhee_sdk.finetune.finetune]'s training loop;
    [`Experiment.finetune`][mhee_sdk.evaluation.Experiment.finetune] reads it as the budget of the whole job
    (frozen head fit, training, re-fit) and gives the loop what is left.
    """

    lora: bool = True
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    soft_tokens: int = 0  # number of collaborative soft tokens; 0 = off
    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-4  # LoRA and soft tokens, at the shallowest layer
    head_lr: float = 2e-3
    depth_boost: float = 1.0
    max_minutes: float | None = 55.0  # stop (and save) when the budget is spent; None = no limit
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneReport:
    """Loss per step, steps and minutes run."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    minutes: float = 0.0
    stopped_by_budget: bool = False

    @property
    def first_loss(self) -> float | None:
        """Mean joint loss over the first 20 steps."""
        return float(np.mean(self.losses[:20])) if self.losses else None

    @property
    def last_loss(self) -> float | None:
        """Mean joint loss over the last 20 steps."""
        return float(np.mean(self.losses[-20:])) if self.losses else None


def add_lora(backbone: TrainableBackbone, config: FinetuneConfig) -> list[nn.Parameter]:
    """Inject LoRA adapters into the backbone's model in place; freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules))
    inject_adapter_in_model(lora, backbone.model)
    trainable = []
    for name, parameter in backbone.model.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name:
            trainable.append(parameter)
    if not trainable:
        raise ValueError(f"no module matched target_modules={config.target_modules}")
    return trainable


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) + 1


def lora_weights(backbone: TrainableBackbone) -> dict[str, torch.Tensor]:
    """The LoRA tensors injected into the backbone's model (what an adapter saves)."""
    return {name: value for name, value in backbone.model.state_dict().items() if "lora_" in name}


def finetune(
    backbone: Backbone,
    heads: ExitHeads,
    texts: Sequence[str],
    labels: Sequence[int],
    config: FinetuneConfig | None = None,
    features: np.ndarray | None = None,
    collab: np.ndarray | None = None,
    system: str | None = None,
) -> tuple[FinetuneReport, SoftTokens | None]:
    """Train LoRA (if ``config.lora``), soft tokens (if ``config.soft_tokens``) and the heads jointly.

    The backbone needs ``interfaces.TrainableBackbone``; LoRA layers are injected into its model in
    place, so build a fresh backbone with the saved adapter afterwards (``Experiment.finetune`` does).
    features: ``[N, F]`` for hybrid heads; collab: ``[N, D]`` collaborative vectors for soft tokens;
    system: the chat system message. Heads should be fitted on frozen features first.
    """
    config = config or FinetuneConfig()
    if not isinstance(backbone, TrainableBackbone):
        raise TypeError(f"backbone {backbone.name!r} has no torch model to fine-tune (interfaces.TrainableBackbone)")
    if config.soft_tokens and collab is None:
        raise ValueError("soft tokens need collab vectors [N, D] (CollaborativeFeatures.embeddings)")
    torch.manual_seed(config.seed)
    num_layers = backbone.num_layers
    groups = []
    if config.lora:
        if not any("lora_" in name for name, _ in backbone.model.named_parameters()):
            add_lora(backbone, config)
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, parameter in backbone.model.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_" in name:
                by_layer.setdefault(_layer_of(name), []).append(parameter)
        lora_rate = depth_lr(config.lr, config.depth_boost)
        groups += [{"params": ps, "lr": lora_rate(layer, num_layers)} for layer, ps in by_layer.items()]
    else:
        backbone.model.requires_grad_(False)
    soft = None
    if config.soft_tokens:
        soft = SoftTokens(collab.shape[1], backbone.hidden_size, config.soft_tokens).to(backbone.device)
        groups.append({"params": list(soft.parameters()), "lr": config.lr})
    head_rate = depth_lr(config.head_lr, config.depth_boost)
    for layer in heads.layers:
        if heads[layer].trainable:
            groups.append({"params": list(heads[layer].parameters()), "lr": head_rate(layer, num_layers)})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    loss_fn = nn.BCEWithLogitsLoss()
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32), device=backbone.device)
    f = None if features is None else torch.as_tensor(np.asarray(features, np.float32), device=backbone.device)
    c = None if collab is None else torch.as_tensor(np.asarray(collab, np.float32), device=backbone.device)
    rng = np.random.default_rng(config.seed)
    report, started = FinetuneReport(), time.perf_counter()
    total = config.epochs * ((len(texts) + config.batch_size - 1) // config.batch_size)
    backbone.model.train()
    heads.train()
    with progress_bar(total=total, desc="fine-tuning", enabled=config.progress) as bar:
        for _ in range(config.epochs):
            order = rng.permutation(len(texts))
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                prefix = None if soft is None else soft(c[rows]).to(backbone.dtype)
                loop = LayerLoop(backbone, [texts[i] for i in rows], heads.layers, prefix=prefix, system=system)
                loss = torch.zeros((), device=backbone.device)
                extra = None if f is None else f[rows]
                for layer, pooled in loop:
                    loss = loss + loss_fn(heads.logits(layer, pooled, extra), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                report.losses.append(float(loss.detach()) / len(heads.layers))
                report.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
                report.minutes = (time.perf_counter() - started) / 60
                if config.max_minutes is not None and report.minutes >= config.max_minutes:
                    report.stopped_by_budget = True
                    break
            if report.stopped_by_budget:
                break
    backbone.model.eval()
    heads.eval()
    return report, soft


def forward_seconds(
    backbone: Backbone,
    texts: Sequence[str],
    depth: int,
    batch_size: int = 16,
    batches: int = 3,
    system: str | None = None,
) -> float:
    """Seconds per request of an inference pass through `depth` layers, timed on batches spread over `texts`.

    Spread, not the first batch: prompt lengths vary along a sample (on the demo's 1,500 prompts the
    first batch ran at 0.25-0.30 s per request, the whole sample at 0.43-0.44).
    """
    starts = sorted(set(np.linspace(0, max(len(texts) - batch_size, 0), batches).astype(int).tolist()))
    rows, started = 0, time.perf_counter()
    with torch.inference_mode():
        for start in starts:
            batch = list(texts[start : start + batch_size])
            for _ in LayerLoop(backbone, batch, [depth], system=system):
                pass
            rows += len(batch)
    return (time.perf_counter() - started) / rows


def training_minutes(budget: float, spent: float, after: float) -> float:
    """What a job budget leaves the training loop once `spent` minutes are gone and `after` are needed."""
    left = budget - spent - after
    if left <= 0:
        raise ValueError(
            f"a {budget:.1f}-minute budget leaves no time to train: {spent:.1f} min went to preparing and about "
            f"{after:.1f} min are needed afterwards to re-fit the heads; raise the budget (--minutes) or use "
            "fewer training requests (--train-requests)"
        )
    return left


def finetune_experiment(experiment: Experiment, name: str, settings: FinetuneConfig | None = None) -> FinetuneReport:
    """Fine-tune an experiment's backbone on its train sample, save adapter `name`, re-fit the heads.

    Afterwards the experiment runs a fresh backbone built with the saved adapter (its name and fingerprint
    say so; ``config.backbone_params["adapter"]`` names it). ``settings.max_minutes`` bounds the whole job:
    the training loop gets what is left after the frozen head fit and a timed estimate of the re-fit (new
    hidden states of train + valid).
    """
    started = time.perf_counter()
    backbone, config = experiment.backbone, experiment.config
    if not isinstance(backbone, TrainableBackbone) or not isinstance(backbone, AdaptedBackbone):
        raise TypeError(f"backbone {backbone.name!r} cannot be fine-tuned (needs a torch model and adapters)")
    if backbone.adapter is not None:
        raise ValueError(f"backbone {backbone.name!r} already has an adapter; fine-tune its base model")
    settings = settings or FinetuneConfig(seed=config.seed, progress=experiment.progress)
    if experiment.heads.trainable and experiment.train_report is None:
        experiment.fit_heads()  # heads start from the frozen fit (and keep its standardization)
    requests = experiment.dataset.requests("train", limit=config.train_requests, seed=config.seed)
    texts, retrieved = experiment.prompts(requests)
    budget = settings.max_minutes
    if budget is not None:
        refit = 0.0  # untrained heads (verbalizer) need no re-fit
        if experiment.heads.trainable:
            rows = len(requests) + config.valid_requests
            per_request = forward_seconds(backbone, texts, experiment.heads.layers[-1], system=experiment.system)
            refit = 1.2 * rows * per_request / 60
        spent = (time.perf_counter() - started) / 60
        settings = replace(settings, max_minutes=training_minutes(budget, spent, refit))
    collab = None
    if settings.soft_tokens:
        from mhee_sdk.exits.features import CollaborativeFeatures

        train = experiment.tables.split("train")
        collab = CollaborativeFeatures().fit(train, experiment.dataset.log, experiment.retriever).embeddings(requests)
    features = experiment.extra_features(requests, retrieved)
    labels = [r.label for r in requests]
    report, soft = finetune(backbone, experiment.heads, texts, labels, settings, features, collab,
                            system=experiment.system)  # fmt: skip
    record = {
        "base": backbone.fingerprint, "config": asdict(settings), "steps": report.steps, "minutes": report.minutes,
        "first_loss": report.first_loss, "last_loss": report.last_loss,  # means over 20 steps: one batch is noise
        "run_config": config.to_dict(), "train_requests": len(requests), "job_budget_minutes": budget,
    }  # fmt: skip
    save_adapter(name, lora_weights(backbone), soft, record)
    experiment.use_adapter(name)  # the model above carries injected LoRA layers: start again from a fresh load
    experiment.fit_heads()
    return report
