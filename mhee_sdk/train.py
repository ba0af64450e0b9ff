"""Fit exit heads on a frozen backbone.

Step 1, [`collect_hidden`][mhee_sdk.train.collect_hidden]: run the backbone once over the prompts and keep
the pooled hidden state of every exit layer, ``[N, L, H]`` float16 on disk, keyed by a hash of (backbone,
layers, prompts). A second run with the same inputs skips the backbone; an interrupted run resumes from
the last batch.

Step 2, [`fit_heads`][mhee_sdk.train.fit_heads]: train all heads together on those features. The loss is a
weighted sum of per-layer binary cross-entropies; each head gets its own learning rate, higher for
shallower heads (the paper's depth-aware rates); each head keeps the parameters of its best validation
epoch, and training stops when no head has improved for `patience` epochs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mhee_sdk import assets
from mhee_sdk.cache import HiddenStateCache
from mhee_sdk.exits.heads import ExitHeads
from mhee_sdk.interfaces import Backbone, FitsInputs
from mhee_sdk.loop import LayerLoop, check_exit_layers
from mhee_sdk.progress import progress_bar


def cache_key(
    fingerprint: str,
    layers: Sequence[int],
    texts: Sequence[str],
    prefix: torch.Tensor | None = None,
    system: str | None = None,
) -> str:
    """Hash identifying a set of hidden states: backbone, exit layers, exact prompts, system message, soft tokens."""
    digest = hashlib.sha256()
    digest.update(json.dumps([fingerprint, list(map(int, layers))]).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    if prefix is not None:
        digest.update(prefix.detach().float().cpu().numpy().tobytes())
    if system is not None:
        digest.update(b"system:" + system.encode())
    return digest.hexdigest()[:24]


def collect_hidden(
    backbone: Backbone,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    prefix: torch.Tensor | None = None,
    system: str | None = None,
) -> np.ndarray:
    """Pooled hidden states ``[N, len(layers), H]`` (float16), from the disk cache when present.

    Runs only up to the deepest requested layer. Entries are checksummed and filled batch by batch
    (``mhee_sdk.cache.HiddenStateCache``): an interrupted call resumes where it stopped, a damaged entry
    is reported and rebuilt, and two processes filling the same entry wait for each other.
    prefix: ``[N, S, H]`` soft tokens, if any; system: the chat system message (see ``Backbone.start``).
    """
    if not texts:
        raise ValueError("collect_hidden needs at least one prompt")
    layers = check_exit_layers(layers, backbone.num_layers)
    cache = HiddenStateCache(Path(cache_dir) if cache_dir is not None else assets.home() / "hidden")
    # the same weights compute slightly different states on another device type: keep their caches apart
    where = "" if backbone.device.type == "cpu" else f"@{backbone.device.type}"
    key = cache_key(backbone.fingerprint + where, layers, texts, prefix, system)
    found = cache.get(key)
    if found is not None:
        return found
    with (
        cache.filling(key, (len(texts), len(layers), backbone.hidden_size)) as fill,
        torch.inference_mode(),
        progress_bar(total=len(texts), initial=fill.rows_done, desc="hidden states", enabled=progress) as bar,
    ):
        for start in range(fill.rows_done, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            chunk_prefix = None if prefix is None else prefix[start : start + len(chunk)]
            loop = LayerLoop(backbone, chunk, layers, prefix=chunk_prefix, system=system)
            fill.write(start, np.stack([pooled.float().cpu().numpy() for _, pooled in loop], axis=1))  # [B, L, H]
            bar.update(len(chunk))
    return cache.get(key)


def depth_lr(base: float, boost: float = 1.0) -> Callable[[int, int], float]:
    """Learning rate per exit layer: ``base * (1 + boost * (1 - layer / num_layers))``.

    The shallowest head trains up to (1 + boost) times faster than the last one; ``boost=0`` is constant.
    """
    if base <= 0 or boost < 0:
        raise ValueError(f"need base > 0 and boost >= 0, got base={base}, boost={boost}")
    return lambda layer, num_layers: base * (1.0 + boost * (1.0 - layer / num_layers))


@dataclass
class TrainConfig:
    """Head training settings."""

    epochs: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    depth_boost: float = 1.0  # see depth_lr
    weight_decay: float = 1e-2
    layer_weights: Sequence[float] | None = None  # loss weight per exit layer; default all 1
    patience: int = 30
    seed: int = 0
    progress: bool = True


@dataclass
class TrainReport:
    """Per exit layer: the epoch kept and its validation loss and AUC."""

    layers: list[int]
    best_epoch: dict[int, int] = field(default_factory=dict)
    valid_loss: dict[int, float] = field(default_factory=dict)
    valid_auc: dict[int, float] = field(default_factory=dict)
    epochs_run: int = 0


def fit_heads(
    heads: ExitHeads,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    valid_features: np.ndarray,
    valid_labels: np.ndarray,
    num_layers: int,
    config: TrainConfig | None = None,
    train_extra: np.ndarray | None = None,
    valid_extra: np.ndarray | None = None,
) -> TrainReport:
    """Train every trainable head on cached features ``[N, L, H]`` (columns = ``heads.layers``).

    train_extra / valid_extra: collaborative features ``[N, F]`` for heads that read them (``hybrid``).
    """
    config = config or TrainConfig()
    layers = heads.layers
    for name, features, labels in (("train", train_features, train_labels), ("valid", valid_features, valid_labels)):
        if features.ndim != 3 or features.shape[1] != len(layers) or len(features) != len(labels):
            raise ValueError(
                f"{name} features must be [N, {len(layers)}, H] with N = {len(labels)} labels, got {features.shape}"
            )
        if len(np.unique(labels)) < 2:
            raise ValueError(f"{name} labels need both classes to train and validate heads")
    device = next(iter(heads.parameters())).device
    x_train = torch.as_tensor(np.asarray(train_features, dtype=np.float32), device=device)
    x_valid = torch.as_tensor(np.asarray(valid_features, dtype=np.float32), device=device)
    y_train = torch.as_tensor(np.asarray(train_labels, dtype=np.float32), device=device)
    y_valid = torch.as_tensor(np.asarray(valid_labels, dtype=np.float32), device=device)
    if heads.needs_features and (train_extra is None or valid_extra is None):
        raise ValueError("these heads read collaborative features: pass train_extra and valid_extra ([N, F])")
    f_train = None if train_extra is None else torch.as_tensor(np.asarray(train_extra, np.float32), device=device)
    f_valid = None if valid_extra is None else torch.as_tensor(np.asarray(valid_extra, np.float32), device=device)
    weights = list(config.layer_weights) if config.layer_weights is not None else [1.0] * len(layers)
    if len(weights) != len(layers):
        raise ValueError(f"layer_weights has {len(weights)} entries for {len(layers)} exit layers")

    trainable = [(j, layer) for j, layer in enumerate(layers) if heads[layer].trainable]
    report = TrainReport(layers=list(layers))
    if not trainable:
        return report
    schedule = depth_lr(config.lr, config.depth_boost)
    groups = []
    for j, layer in trainable:
        head = heads[layer]
        if isinstance(head, FitsInputs):  # fixed input statistics first: training then sees standardized inputs
            head.fit_inputs(x_train[:, j], f_train)
        groups.append({"params": list(head.parameters()), "lr": schedule(layer, num_layers)})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout in mlp heads draws from the global stream
    best = {layer: (float("inf"), -1, None) for _, layer in trainable}
    stale = 0
    for epoch in progress_bar(range(config.epochs), desc="training heads", enabled=config.progress):
        heads.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            extra = None if f_train is None else f_train[rows]
            loss = sum(
                weights[j] * loss_fn(heads.logits(layer, x_train[rows, j], extra), y_train[rows])
                for j, layer in trainable
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        heads.eval()
        improved = False
        with torch.no_grad():
            for j, layer in trainable:
                valid_loss = float(loss_fn(heads.logits(layer, x_valid[:, j], f_valid), y_valid))
                if valid_loss < best[layer][0] - 1e-5:
                    best[layer] = (valid_loss, epoch, copy.deepcopy(heads[layer].state_dict()))
                    improved = True
        report.epochs_run = epoch + 1
        stale = 0 if improved else stale + 1
        if stale >= config.patience:
            break
    with torch.no_grad():
        for j, layer in trainable:
            valid_loss, epoch, state = best[layer]
            heads[layer].load_state_dict(state)
            report.best_epoch[layer] = epoch
            report.valid_loss[layer] = valid_loss
            probs = heads.predict(layer, x_valid[:, j], f_valid).cpu().numpy()
            report.valid_auc[layer] = float(roc_auc_score(valid_labels, probs))
    heads.eval()
    return report
