"""Exit heads: small modules that read one exit layer's pooled hidden state and give P(like).

``linear`` and ``mlp`` are trained (see ``mhee_sdk.train``); ``verbalizer`` reuses the model's own
final norm and LM head and compares the "Yes" and "No" logits, so it needs no training.
Every head follows ``mhee_sdk.interfaces.ExitHead``: log-odds from ``logits(hidden, features)`` and
P(like) from ``forward(hidden, features)``; heads that do not read features ignore them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import Backbone, ExitHead, LanguageModelHead, require


def default_exit_layers(num_layers: int, every: int = 3) -> list[int]:
    """Every `every`-th layer and the last one, 1-based (30 layers -> 3, 6, ..., 30)."""
    if num_layers < 1 or every < 1:
        raise ValueError(f"need num_layers >= 1 and every >= 1, got {num_layers}, {every}")
    layers = list(range(every, num_layers + 1, every))
    return layers if layers and layers[-1] == num_layers else [*layers, num_layers]


class Standardize(nn.Module):
    """Per-feature (x - mean) / std with statistics fitted on training features.

    Mid-layer hidden states carry a few huge "massive activation" dimensions; without this a
    linear head spends its training budget on their scale.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))

    def fit(self, features: torch.Tensor) -> None:
        """Set mean/std from ``features [N, H]``."""
        self.mean.copy_(features.float().mean(0))
        self.std.copy_(features.float().std(0).clamp_min(1e-4))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() - self.mean) / self.std


class LinearHead(nn.Module):
    """Logistic regression on the standardized hidden state."""

    trainable = True
    needs_features = False

    def __init__(self, hidden_size: int, layer: int, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.standardize = Standardize(hidden_size)
        self.linear = nn.Linear(hidden_size, 1)

    def fit_inputs(self, hidden: torch.Tensor, features: torch.Tensor | None) -> None:
        """Fit the standardization on training hidden states."""
        self.standardize.fit(hidden)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Log-odds of "like", ``[B]``."""
        return self.linear(self.standardize(hidden)).squeeze(-1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


class MLPHead(LinearHead):
    """One hidden layer (GELU, dropout) on the standardized hidden state."""

    def __init__(
        self, hidden_size: int, layer: int, width: int = 128, dropout: float = 0.1, backbone: Backbone | None = None
    ) -> None:
        super().__init__(hidden_size, layer)
        self.linear = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1))


class LowRank(nn.Module):
    """Standardize, then project on the top `rank` principal components of the training features.

    Fitted once (no gradient), like [`Standardize`][mhee_sdk.exits.heads.Standardize]: with a few hundred
    training requests a 576-wide hidden state overfits, while its leading components keep most of what a
    head can use.
    """

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ValueError(f"rank={rank!r} must be in 1..{hidden_size}")
        self.standardize = Standardize(hidden_size)
        self.register_buffer("components", torch.eye(hidden_size)[:, :rank].clone())

    def fit(self, features: torch.Tensor) -> None:
        """Fit the standardization and the principal components on ``features [N, H]``."""
        self.standardize.fit(features)
        z = self.standardize(features)
        z = z - z.mean(0)
        _, _, v = torch.linalg.svd(z, full_matrices=False)  # rows of v: components, largest first
        self.components.copy_(v[: self.components.shape[1]].T)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.standardize(hidden) @ self.components


class HybridHead(nn.Module):
    """Logistic regression on the hidden state *and* collaborative features (``mhee_sdk.exits.features``).

    The features carry what the retriever found as numbers (GCN score, like-rates, similar users'
    ratings). The hidden state enters through its top `rank` principal components (None: all of it).
    Compare with the ``collab-logistic`` baseline, the same features without the LLM, to see what the
    hidden state adds.
    """

    trainable = True
    needs_features = True

    def __init__(
        self,
        hidden_size: int,
        layer: int,
        feature_size: int | None = None,
        rank: int | None = 8,
        backbone: Backbone | None = None,
    ) -> None:
        super().__init__()
        from mhee_sdk.exits.features import FEATURE_NAMES

        self.layer = layer
        feature_size = feature_size or len(FEATURE_NAMES)
        self.standardize = LowRank(hidden_size, rank) if rank else Standardize(hidden_size)
        self.feature_standardize = Standardize(feature_size)
        self.linear = nn.Linear((rank or hidden_size) + feature_size, 1)

    def fit_inputs(self, hidden: torch.Tensor, features: torch.Tensor | None) -> None:
        """Fit the hidden-state projection and the feature standardization on the training rows."""
        if features is None:
            raise ValueError("the hybrid head needs collaborative features to fit its standardization")
        self.standardize.fit(hidden)
        self.feature_standardize.fit(features)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Log-odds of "like" from ``hidden [B, H]`` and ``features [B, F]``."""
        if features is None:
            raise ValueError("the hybrid head needs collaborative features (the engine passes them)")
        joined = torch.cat([self.standardize(hidden), self.feature_standardize(features)], dim=-1)
        return self.linear(joined).squeeze(-1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden, features))


class VerbalizerHead(nn.Module):
    """The LM's own answer: final norm + LM head, P("Yes") vs P("No"). Needs no training.

    At an intermediate layer this is the "logit lens" reading of that layer.
    """

    trainable = False
    needs_features = False

    def __init__(
        self, hidden_size: int, layer: int, backbone: Backbone | None = None, words: Sequence[str] = ("Yes", "No")
    ) -> None:
        super().__init__()
        if backbone is None or not isinstance(backbone, LanguageModelHead):
            raise ValueError(
                "the verbalizer head needs a backbone with an LM head (interfaces.LanguageModelHead), "
                f"got {type(backbone).__name__}"
            )
        self.layer = layer
        self.norm = copy.deepcopy(backbone.final_norm_module()).float().requires_grad_(False)
        self.register_buffer("rows", backbone.lm_head_rows(backbone.answer_token_ids(words)).float())
        self.multiplier, self.softcap = backbone.logit_scaling()  # the family's own (Gemma 2 soft-caps)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Yes-logit minus No-logit, ``[B]`` (softmax over the pair = sigmoid of this)."""
        scores = self.multiplier * (self.norm(hidden.float()) @ self.rows.T)  # [B, 2]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores[:, 0] - scores[:, 1]

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


class ExitHeads(nn.Module):
    """One head per exit layer, evaluated in layer order."""

    def __init__(self, heads: Sequence[ExitHead], kind: str = "custom") -> None:
        super().__init__()
        for head in heads:
            require(head, ExitHead, f"exit head of kind {kind!r}:")
            if not isinstance(head, nn.Module):
                raise TypeError(f"exit head of kind {kind!r}: {type(head).__name__} is not a torch.nn.Module")
        layers = [int(h.layer) for h in heads]
        if not layers or layers != sorted(set(layers)):
            raise ValueError(f"exit heads need distinct layers in increasing order, got {layers}")
        self.kind = kind
        self.layers = layers
        self.heads = nn.ModuleDict({str(layer): head for layer, head in zip(layers, heads, strict=True)})

    def __getitem__(self, layer: int) -> ExitHead:
        return self.heads[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.heads

    def __repr__(self) -> str:
        return f"ExitHeads({self.kind!r}, layers={self.layers})"

    @property
    def trainable(self) -> bool:
        """True when any head has parameters to fit."""
        return any(head.trainable for head in self.heads.values())

    @property
    def needs_features(self) -> bool:
        """True when any head reads collaborative features beside the hidden state."""
        return any(head.needs_features for head in self.heads.values())

    def predict(self, layer: int, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """P(like) of the head on `layer`, ``[B]``."""
        return self.heads[str(layer)](hidden, features)

    def logits(self, layer: int, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Log-odds of the head on `layer` (for training)."""
        return self.heads[str(layer)].logits(hidden, features)


def check_head_output(probs: np.ndarray, layer: int, kind: str) -> np.ndarray:
    """Head outputs must be probabilities: finite and in [0, 1]. Raises naming the head and layer."""
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        raise ValueError(
            f"exit head {kind!r} on layer {layer} returned {probs[bad][0]!r} for {int(bad.sum())} of {len(probs)} "
            "rows; a head must return P(like) in [0, 1] (check its inputs for NaN and that forward applies sigmoid)"
        )
    return probs


def save_heads(
    heads: ExitHeads,
    path: str | os.PathLike,
    fingerprint: str,
    head_params: dict[str, Any],
    valid_auc: dict[int, float] | None = None,
) -> Path:
    """Save trained heads with the backbone fingerprint they were trained on, their kind, layers and params."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {k: v.cpu() for k, v in heads.state_dict().items()}, "kind": heads.kind,
                "layers": heads.layers, "head_params": dict(head_params), "fingerprint": fingerprint,
                "valid_auc": valid_auc}, path)  # fmt: skip
    return path


def load_heads(path: str | os.PathLike, backbone: Backbone, registry=None) -> tuple[ExitHeads, dict[str, Any]]:
    """Heads saved by `save_heads`, rebuilt on `backbone` (which must have the fingerprint they were trained on)."""
    saved = torch.load(Path(path), weights_only=True)
    if saved["fingerprint"] != backbone.fingerprint:
        raise ValueError(
            f"heads in {path} were trained on backbone {saved['fingerprint']!r}, but this experiment runs "
            f"{backbone.fingerprint!r}; train them here with fit_heads() or use the backbone they came from"
        )
    heads = build_heads(saved["kind"], backbone, saved["layers"], registry, **saved["head_params"])
    heads.load_state_dict(saved["state"])
    return heads.eval(), saved["head_params"]


def build_heads(
    kind: str,
    backbone: Backbone,
    layers: Sequence[int] | None = None,
    registry=None,
    seed: int = 0,
    **params: object,
) -> ExitHeads:
    """Heads of registered `kind` on `layers` (default: every 3rd layer and the last), initialised from `seed`."""
    from mhee_sdk.registry import get_registry

    registry = registry or get_registry()
    layers = list(layers) if layers is not None else default_exit_layers(backbone.num_layers)
    bad = [layer for layer in layers if not 1 <= int(layer) <= backbone.num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} are outside 1..{backbone.num_layers} for backbone {backbone.name!r}")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation; the caller's random stream is untouched
        torch.manual_seed(seed)
        heads = [
            registry.create(
                "exit_head", kind, hidden_size=backbone.hidden_size, layer=int(layer), backbone=backbone, **params
            )
            for layer in sorted(set(int(x) for x in layers))
        ]
    return ExitHeads(heads, kind=kind).to(backbone.device)


@hookimpl
def register_exit_heads(register) -> None:
    register("linear", LinearHead)
    register("mlp", MLPHead)
    register("verbalizer", VerbalizerHead)
    register("hybrid", HybridHead)
