"""Records that flow through the pipeline: requests in, retrieved evidence, predictions out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One CTR question: will `user` like `item`, asked at time `ts`?

    `request_id` is the row of the interaction in the time-ordered log, so it is stable across runs.
    `label` is 1 when the user liked the item (a click, or a rating at or above the dataset's like threshold:
    4 on MovieLens), else 0. `user`, `item` and `ts` are the dataset's integer codes (``InteractionsDataset``
    keeps the original ids and times in its tables).
    """

    request_id: int
    user: int
    item: int
    label: int
    ts: int


@dataclass(frozen=True)
class Retrieved:
    """One piece of evidence for a request: an earlier interaction `(user, item, rating, ts)`.

    `score` is the retriever's relevance score (higher is more relevant) and `why` a short
    human-readable reason shown in notebooks ("similar user, cos 0.83").
    """

    user: int
    item: int
    rating: float
    ts: int
    score: float
    why: str = ""


@dataclass(frozen=True)
class Prediction:
    """The engine's answer for one request.

    `layer_probs` holds P(like) of every exit head evaluated, in exit-layer order, up to and
    including `exit_layer` (1-based: the number of decoder layers that ran).
    """

    request_id: int
    prob: float
    exit_layer: int
    layer_probs: tuple[float, ...]
    latency_s: float


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as `mhee plugins` reports it."""

    name: str
    version: str
    hooks: tuple[str, ...]
    source: str  # "builtin" or "entry point"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to import or whose hook raised; it was skipped."""

    name: str
    error: str
