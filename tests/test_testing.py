"""The conformance suite: built-ins pass it, and broken implementations fail with a message saying what to fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mhee_sdk.baselines import Logistic, Popularity
from mhee_sdk.exits.heads import LinearHead
from mhee_sdk.testing import ContractError, check_baseline, check_exit_head, check_exit_policy

# --------------------------------------------------------------------------- exit heads


@pytest.mark.parametrize("kind", ["linear", "mlp", "verbalizer", "hybrid"])
def test_builtin_heads_pass(registry, tiny, kind):
    entry, _ = registry.get("exit_head", kind)
    check_exit_head(entry.factory, hidden_size=tiny.hidden_size, layer=3, backbone=tiny)


def test_builtin_policies_pass(registry):
    for name in registry.names("exit_policy"):
        check_exit_policy(registry.create("exit_policy", name))


class _Head(nn.Module):
    """A correct linear head to break one way at a time."""

    trainable = True
    needs_features = False

    def __init__(self, hidden_size: int, layer: int, backbone: object = None) -> None:
        super().__init__()
        self.layer = layer
        self.linear = nn.Linear(hidden_size, 1)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


class KeepsLastDim(_Head):
    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.linear(hidden))  # [B, 1]


class ReturnsLogOdds(_Head):
    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(hidden)


class BatchNormalised(_Head):
    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(hidden - hidden.mean(0)).squeeze(-1)


class NoisyInEval(_Head):
    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden) + torch.randn(len(hidden)))


class TemperatureMismatch(_Head):
    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden) / 2)


class ForgetsLayer(_Head):
    def __init__(self, hidden_size: int, layer: int, backbone: object = None) -> None:
        super().__init__(hidden_size, layer)
        del self.layer


class NotTrainable(_Head):
    trainable = "no"  # type: ignore[assignment]


class ForgetsNeedsFeatures(_Head):
    needs_features = None  # type: ignore[assignment]


class NoFeaturesArgument(_Head):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sigmoid(self.logits(hidden))


class NoParameters(nn.Module):
    trainable = True
    needs_features = False

    def __init__(self, hidden_size: int, layer: int, backbone: object = None) -> None:
        super().__init__()
        self.layer = layer

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return hidden[:, 0]

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


class NoLogits(nn.Module):
    trainable = True
    needs_features = False

    def __init__(self, hidden_size: int, layer: int, backbone: object = None) -> None:
        super().__init__()
        self.layer = layer
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.linear(hidden).squeeze(-1))


def positional_factory(hidden_size: int, layer: int) -> _Head:
    return _Head(hidden_size, layer)


class PlainObject:
    layer, trainable = 3, False

    def __init__(self, **_: object) -> None:
        pass


@pytest.mark.parametrize(
    ("factory", "problem", "fix"),
    [
        (KeepsLastDim, "returned (16, 1) for a batch of 16 rows, expected shape (16,)", "e.g. .squeeze(-1)"),
        (ReturnsLogOdds, "returned values outside [0, 1]", "torch.sigmoid of the log-odds"),
        (BatchNormalised, "changes when it is scored in a smaller batch", "from its own hidden state only"),
        (NoisyInEval, "two calls in eval mode gave different outputs", "use no randomness outside training"),
        (TemperatureMismatch, "forward() is not sigmoid(logits())", "return torch.sigmoid(self.logits(hidden))"),
        (ForgetsLayer, "has layer='<missing>', expected 3", "self.layer = layer"),
        (NotTrainable, "has trainable='no', not a bool", "trainable = True"),
        (ForgetsNeedsFeatures, "has needs_features=None, not a bool", "needs_features = False"),
        (NoFeaturesArgument, "forward(hidden, features) raised TypeError", "accept a second argument features=None"),
        (NoParameters, "has no parameters that require grad", "or set trainable = False"),
        (NoLogits, "has no logits() method", "add logits(hidden, features=None)"),
        (positional_factory, "raised TypeError", "accept the keyword arguments hidden_size, layer and backbone"),
        (PlainObject, "is a PlainObject, not a torch.nn.Module", "subclass torch.nn.Module"),
    ],
)
def test_broken_heads_fail_with_what_to_fix(factory, problem, fix):
    with pytest.raises(ContractError) as caught:
        check_exit_head(factory, hidden_size=32, layer=3)
    message = str(caught.value)
    assert message.startswith("exit head ")
    assert problem in message
    assert fix in message.split("Fix:", 1)[1]


def test_a_correct_custom_head_passes():
    check_exit_head(_Head, hidden_size=32, layer=7, rows=9)
    check_exit_head(LinearHead, hidden_size=32, layer=7)


# --------------------------------------------------------------------------- baselines


def test_popularity_passes(movielens):
    check_baseline(Popularity(), movielens)
    check_baseline(Popularity(streaming=False), movielens)


def test_logistic_passes(movielens):
    tables = movielens.load()
    check_baseline(Logistic(users=tables.users, items=tables.items), movielens)


class _Baseline:
    name = "broken"

    def fit(self, train, log):
        self.prior = float(train["label"].mean())
        return self

    def score(self, requests):
        return np.array([self.prior + 1e-3 * (r.item % 7) for r in requests])


class BatchZScore(_Baseline):
    def score(self, requests):
        raw = super().score(requests)
        return (raw - raw.mean()) / raw.std()


class OneShort(_Baseline):
    def score(self, requests):
        return super().score(requests)[:-1]


class NaNForUnseen(_Baseline):
    def score(self, requests):
        out = super().score(requests)
        out[::3] = np.nan
        return out


class Forgetful(_Baseline):
    def fit(self, train, log):
        super().fit(train, log)


class Random(_Baseline):
    def score(self, requests):
        return np.random.default_rng().uniform(size=len(requests))


@pytest.mark.parametrize(
    ("baseline", "problem", "fix"),
    [
        (BatchZScore, "depends on the other requests scored with it", "score each request on its own"),
        (OneShort, "score() returned shape (59,) for 60 requests", "one float per request, in request order"),
        (NaNForUnseen, "returned NaN or inf for requests", "finite fallback score"),
        (Forgetful, "fit() did not return self", "end fit() with `return self`"),
        (Random, "two identical score() calls gave different results", "seed any randomness"),
    ],
)
def test_broken_baselines_fail_with_what_to_fix(movielens, baseline, problem, fix):
    with pytest.raises(ContractError) as caught:
        check_baseline(baseline(), movielens)
    message = str(caught.value)
    assert message.startswith("baseline 'broken': ")
    assert problem in message
    assert fix in message.split("Fix:", 1)[1]
