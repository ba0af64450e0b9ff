"""Baseline retrievers: nothing, the most recent ratings (as TALLRec), or a seeded random sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mhee_sdk.data.log import Events, InteractionLog
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.types import Request, Retrieved


def to_retrieved(events: Events, scores: np.ndarray, why: str) -> list[Retrieved]:
    """Retrieved records from parallel event arrays, in the given order."""
    return [
        Retrieved(user=int(u), item=int(i), rating=float(r), ts=int(t), score=float(s), why=why)
        for u, i, r, t, s in zip(events.user, events.item, events.rating, events.ts, scores, strict=True)
    ]


def check_k(k: int) -> int:
    """Validate a retrieval depth."""
    if not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k={k!r} must be a non-negative integer")
    return int(k)


class _LogRetriever:
    """Shared fit(): keep the log; retrieval reads the user's history strictly before the request."""

    log: InteractionLog | None = None

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> _LogRetriever:
        self.log = log
        return self

    def _history(self, request: Request) -> Events:
        if self.log is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(train, log) first")
        return self.log.before(request.user, request.ts)


class NoRetriever(_LogRetriever):
    """No evidence: the prompt holds only the profile and the candidate."""

    name = "none"

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        check_k(k)
        return [[] for _ in requests]


class RecentRetriever(_LogRetriever):
    """The user's `k` most recent earlier ratings, newest first."""

    name = "recent"

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        k = check_k(k)
        out = []
        for request in requests:
            events = self._history(request).last(k)
            order = np.arange(events.size)[::-1]
            picked = Events(*(column[order] for column in events))
            out.append(to_retrieved(picked, np.arange(picked.size, 0, -1, dtype=float), "recent"))
        return out


class RandomRetriever(_LogRetriever):
    """`k` of the user's earlier ratings drawn at random, seeded per request (reproducible)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        k = check_k(k)
        out = []
        for request in requests:
            events = self._history(request)
            rng = np.random.default_rng([self.seed, request.request_id])
            order = rng.permutation(events.size)[:k]
            picked = Events(*(column[order] for column in events))
            out.append(to_retrieved(picked, np.zeros(picked.size), "random"))
        return out


@hookimpl
def register_retrievers(register) -> None:
    register("none", NoRetriever)
    register("recent", RecentRetriever)
    register("random", RandomRetriever)
