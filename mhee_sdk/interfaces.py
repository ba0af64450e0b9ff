"""The contracts a plugin implements: Dataset, Retriever, Backbone, ExitHead, ExitPolicy.

They are structural (``typing.Protocol``): a class needs the methods, not a base class.
``mhee_sdk.testing`` checks an implementation against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from mhee_sdk.types import Request, Retrieved

if TYPE_CHECKING:
    import pandas as pd

    from mhee_sdk.data.log import InteractionLog

SPLITS = ("train", "valid", "test")


@runtime_checkable
class Dataset(Protocol):
    """Users, items and time-stamped ratings, with a leakage-free split into requests."""

    def load(self) -> DatasetTables:
        """Read (or return the cached) tables."""
        ...

    def requests(self, split: str, limit: int | None = None, seed: int = 0) -> list[Request]:
        """The requests of `split` (one of SPLITS), time-ordered; `limit` samples that many."""
        ...


@dataclass(frozen=True)
class DatasetTables:
    """What a dataset loads.

    interactions: ``user, item, rating, ts, label, split`` sorted by time; the row number is the
    request id. users: ``user`` plus profile columns. items: ``item, title, year, genres``.
    """

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame

    def split(self, name: str) -> pd.DataFrame:
        """The interactions of one split."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is unknown; choose from: {', '.join(SPLITS)}")
        return self.interactions[self.interactions["split"] == name]


@runtime_checkable
class Retriever(Protocol):
    """Finds earlier interactions that help answer a request."""

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Retriever:
        """Learn from `train` interactions only; `log` answers "what happened before ts"."""
        ...

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        """Per request, up to `k` interactions strictly before its timestamp, best first."""
        ...


@dataclass(frozen=True)
class LayerState:
    """A batch in flight through the backbone.

    Every tensor has the batch as its first dimension, so dropping finished rows is one index.
    hidden: ``[B, T, H]`` after `layers_done` decoder layers; mask: ``[B, T]`` (1 = real token,
    prompts are left-padded); extras: backbone-specific per-row tensors (rotary tables, 4-D masks).
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    layers_done: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows still in flight."""
        return int(self.hidden.shape[0])

    def select(self, rows: torch.Tensor) -> LayerState:
        """Keep only `rows` (a 1-D index tensor), in that order."""
        return replace(
            self,
            hidden=self.hidden[rows],
            mask=self.mask[rows],
            extras={name: value[rows] for name, value in self.extras.items()},
        )


@runtime_checkable
class Backbone(Protocol):
    """A decoder-only LM that can be run one layer at a time."""

    num_layers: int
    hidden_size: int
    fingerprint: str  # identifies weights + tokenizer, for caches

    def start(self, texts: Sequence[str]) -> LayerState:
        """Tokenize (left padding) and embed a batch: the state before layer 1."""
        ...

    def step(self, state: LayerState) -> LayerState:
        """Run the next decoder layer (number ``state.layers_done + 1``)."""
        ...

    def pooled(self, state: LayerState) -> torch.Tensor:
        """The hidden state of each row's last real token, ``[B, H]``."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many tokens `start` would use for `text`."""
        ...


@runtime_checkable
class ExitPolicy(Protocol):
    """Decides, after each exit head, which rows are confident enough to stop."""

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        """`probs` is ``[B, j]``: every head output so far (last column = `layer`); returns bool ``[B]``."""
        ...


@runtime_checkable
class ExitHead(Protocol):
    """A ``torch.nn.Module`` on one exit layer: pooled hidden ``[B, H]`` to P(like) ``[B]``."""

    layer: int  # 1-based decoder layer it reads
    trainable: bool  # False for heads that need no fitting (verbalizer)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(like) per row, in [0, 1]."""
        ...
