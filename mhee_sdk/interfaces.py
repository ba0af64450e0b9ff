"""The contracts between the core and its plugins: everything the core calls, stated once.

Each contract is a ``typing.Protocol``: a class needs the members, not a base class. The core calls
these members directly and nothing else. Optional capabilities (a policy that calibrates, a head that
fits input statistics, a retriever with item embeddings ...) are small Protocols of their own, checked
once with ``isinstance`` where the core first meets the object. ``mhee_sdk.testing`` checks an
implementation against its contract; ``docs/plugins.md`` shows one of each.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mhee_sdk.types import Request, Retrieved

if TYPE_CHECKING:  # torch, numpy and pandas stay unimported until a command needs them (fast CLI start)
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from mhee_sdk.adapters import Adapter
    from mhee_sdk.data.log import InteractionLog
    from mhee_sdk.data.prompt import PromptTemplate

SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetTables:
    """What a dataset loads.

    interactions: ``user, item, rating, ts, label, split`` sorted by time; the row number is the
    request id. users: ``user`` plus profile columns. items: ``item`` plus descriptive columns.
    ``InteractionsDataset`` adds the original ids (``user_id``, ``item_id``) and times (``time``).
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
class Dataset(Protocol):
    """Users, items and time-stamped interactions, with a leakage-free split into requests."""

    def load(self) -> DatasetTables:
        """Read (or return the cached) tables."""
        ...

    def requests(self, split: str, limit: int | None = None, seed: int = 0) -> list[Request]:
        """The requests of `split` (one of SPLITS), time-ordered; `limit` draws a seeded sample of that size."""
        ...

    @property
    def log(self) -> InteractionLog:
        """Every interaction, for "strictly before ts" look-ups by user or item."""
        ...


@runtime_checkable
class TemplatedDataset(Protocol):
    """Capability: the dataset's own prompt wording; others get the generic ``PromptTemplate()``.

    A run config's ``prompt`` table overrides single fields of it.
    """

    @property
    def prompt_template(self) -> PromptTemplate:
        """Domain noun, item and user descriptions, system prompt, question, answer words, evidence wording."""
        ...


# --------------------------------------------------------------------------- retrievers
@runtime_checkable
class Retriever(Protocol):
    """Finds earlier interactions that help answer a request."""

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Retriever:
        """Learn from `train` interactions only; `log` answers "what happened before ts". Returns self."""
        ...

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        """Per request, up to `k` interactions strictly before its timestamp, best first."""
        ...


@runtime_checkable
class ItemEmbeddings(Protocol):
    """Capability of a fitted retriever: a learned vector per item id (collaborative features read it)."""

    @property
    def item_embeddings(self) -> np.ndarray:
        """``[num_items, D]`` by item id; zero rows for items it never saw."""
        ...


# --------------------------------------------------------------------------- backbones
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
    """A decoder-only LM that can be run one layer at a time (see ``mhee_sdk.loop.LayerLoop``)."""

    name: str  # registry name, shown in reports
    device: torch.device
    dtype: torch.dtype  # of the hidden states it computes
    num_layers: int
    hidden_size: int
    fingerprint: str  # identifies weights, adapter, tokenizer and precision: hidden-state caches are keyed on it

    def start(
        self, texts: Sequence[str], prefix: torch.Tensor | None = None, system: str | None = None
    ) -> LayerState:
        """Tokenize (left padding) and embed a batch of prompts: the state before layer 1.

        prefix: ``[B, S, H]`` input embeddings placed before each prompt (collaborative soft tokens).
        system: the task's system message, for backbones with a chat template (others may ignore it).
        """
        ...

    def step(self, state: LayerState) -> LayerState:
        """Run the next decoder layer (number ``state.layers_done + 1``) on every row; ValueError once all ran."""
        ...

    def pooled(self, state: LayerState) -> torch.Tensor:
        """The hidden state of each row's last real token, ``[B, H]``."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` takes in `start` (before any chat template), for prompt budgets."""
        ...


@runtime_checkable
class AdaptedBackbone(Protocol):
    """Capability: a backbone built with a fine-tuned adapter (``mhee_sdk.adapters.Adapter``) or none."""

    adapter: Adapter | None


@runtime_checkable
class TrainableBackbone(Protocol):
    """Capability: the torch module fine-tuning injects LoRA layers into (``mhee_sdk.finetune``)."""

    model: nn.Module


@runtime_checkable
class LanguageModelHead(Protocol):
    """Capability: the LM's own output layer, which the ``verbalizer`` head reads."""

    def answer_token_ids(self, words: Sequence[str]) -> list[int]:
        """First token id of each answer word as the model would write it after the prompt."""
        ...

    def lm_head_rows(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Rows of the output embedding for these tokens, ``[len(token_ids), H]`` (a copy)."""
        ...

    def final_norm_module(self) -> nn.Module:
        """The final norm the LM head reads after."""
        ...

    def logit_scaling(self) -> tuple[float, float | None]:
        """``(multiplier, soft cap)`` on raw LM-head outputs: ``tanh(m * x / cap) * cap``; no cap: ``m * x``."""
        ...


# --------------------------------------------------------------------------- exit heads
@runtime_checkable
class ExitHead(Protocol):
    """A ``torch.nn.Module`` on one exit layer: pooled hidden ``[B, H]`` (+ features ``[B, F]``) to P(like) ``[B]``.

    The factory is called as ``factory(hidden_size=..., layer=..., backbone=..., **params)``.
    """

    layer: int  # 1-based decoder layer it reads
    trainable: bool  # False for heads that need no fitting (verbalizer)
    needs_features: bool  # True: it reads collaborative features ``[B, F]`` beside the hidden state

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Log-odds of "like", ``[B]``; training fits these."""
        ...

    def __call__(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """P(like) per row, in [0, 1]: ``sigmoid(logits)``."""
        ...


@runtime_checkable
class FitsInputs(Protocol):
    """Capability of a head: fixed input statistics (standardization, projections) fitted before training."""

    def fit_inputs(self, hidden: torch.Tensor, features: torch.Tensor | None) -> None:
        """Fit on the training rows: ``hidden [N, H]``, ``features [N, F]`` or None."""
        ...


# --------------------------------------------------------------------------- exit policies
@runtime_checkable
class ExitPolicy(Protocol):
    """Decides, after each exit head, which rows are confident enough to stop."""

    name: str

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        """`probs` is ``[B, j]``: every head output so far (last column = `layer`); returns bool ``[B]``.

        Each row's decision may depend on that row's outputs only (the engine drops finished rows, and
        replay asks every row at every layer).
        """
        ...


@runtime_checkable
class CalibratedPolicy(Protocol):
    """Capability: a policy fitted on validation outputs before use (``calibrated``)."""

    @property
    def is_calibrated(self) -> bool:
        """True once calibrated (or built from stored calibrated parameters)."""
        ...

    def calibrate(self, probs: np.ndarray, labels: np.ndarray, layers: Sequence[int]) -> CalibratedPolicy:
        """Fit on full-depth validation outputs ``probs [N, L]`` with ``labels [N]``; returns self."""
        ...

    def calibrated_params(self) -> dict[str, Any]:
        """Factory parameters that rebuild it calibrated (stored with the run, e.g. ``{"thresholds": ...}``)."""
        ...


@dataclass(frozen=True)
class Knob:
    """One tunable parameter of a policy, as a slider: its range, step and default.

    exit_layers: the value is one of the run's exit layers (low/high ignored). log: sweep on a log scale.
    """

    name: str
    low: float = 0.0
    high: float = 1.0
    step: float = 0.01
    default: float = 0.5
    integer: bool = False
    exit_layers: bool = False
    log: bool = False

    def __post_init__(self) -> None:
        if self.exit_layers:
            return  # the run's exit layers are the values
        if not self.low <= self.default <= self.high or self.step <= 0:
            raise ValueError(f"knob {self.name!r}: need low <= default <= high and step > 0, got {self}")
        if self.integer and (self.step != int(self.step) or self.step < 1):
            raise ValueError(f"knob {self.name!r} is an integer: its step must be a whole number >= 1, not {self.step}")

@runtime_checkable
class TunablePolicy(Protocol):
    """Capability: the parameters a notebook may tune (PolicyTuner makes sliders of them); the first is swept."""

    knobs: tuple[Knob, ...]


@runtime_checkable
class ThresholdPolicy(Protocol):
    """Capability: a policy that exits when the head's confidence ``max(p, 1 - p)`` reaches a level."""

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """Per exit layer, the confidence level at or above which it may exit (layers without one left out)."""
        ...


# --------------------------------------------------------------------------- baselines
@runtime_checkable
class Baseline(Protocol):
    """A classic (non-LLM) recommender scored on the same requests.

    Factories receive ``users=``, ``items=``, ``retriever=``, ``train_requests=``, ``k=`` and ``seed=``
    when their signature names them (see ``Experiment.run_baseline``).
    """

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Baseline:
        """Learn from training interactions only (and the strictly-earlier log); returns self."""
        ...

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        """One finite float per request, higher = more likely liked (calibrated on validation by the core)."""
        ...


def require(obj: object, protocol: type, what: str) -> None:
    """Raise TypeError naming the members `obj` lacks to satisfy `protocol` (a runtime-checkable Protocol)."""
    if isinstance(obj, protocol):
        return
    missing = [name for name in protocol_members(protocol) if not hasattr(obj, name)]
    raise TypeError(
        f"{what} {type(obj).__name__} does not follow mhee_sdk.interfaces.{protocol.__name__}: "
        f"missing {', '.join(missing) or '(a member)'}; see docs/plugins.md"
    )


def protocol_members(protocol: type) -> list[str]:
    """The public members a Protocol declares (annotated attributes, methods, properties), in order."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol) or cls.__module__ == "typing":
            continue
        for name in [*inspect.get_annotations(cls), *vars(cls)]:
            if (name.startswith("_") and name != "__call__") or name in names:
                continue
            names.append(name)
    return names
