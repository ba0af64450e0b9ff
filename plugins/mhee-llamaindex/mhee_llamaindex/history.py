"""What the BM25 and vector retrievers share: fit keeps the log, retrieve asks it per request."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from llama_index.core.schema import NodeWithScore

from mhee_llamaindex.nodes import best_first, item_texts, load_items
from mhee_sdk.data.log import Events, InteractionLog
from mhee_sdk.retrievers.simple import check_k
from mhee_sdk.types import Request, Retrieved


class HistoryRetriever:
    """Base: evidence for a request is ``log.before(user, ts)``, searched with the candidate's text.

    `train` is not used: the log already answers "what did the user do before ts", and nothing later.
    """

    name = "history"

    def __init__(self, items: pd.DataFrame | None = None) -> None:
        self.items = items if items is None else load_items(items)
        self.log: InteractionLog | None = None
        self.catalogue: pd.DataFrame | None = None
        self._item_text: Callable[[int], str] | None = None

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> HistoryRetriever:
        """Keep `log`; drop indexes built from an earlier one."""
        if not callable(getattr(log, "before", None)):
            raise TypeError(f"{type(self).__name__}.fit needs an InteractionLog, got {type(log).__name__}")
        self.log = log
        if self._item_text is None:
            self.catalogue = load_items(self.items)
            self._item_text = item_texts(self.catalogue)
        self._reset()
        return self

    def item_text(self, item: int) -> str:
        """The candidate's query text: title, year and genres."""
        if self._item_text is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(train, log) first")
        return self._item_text(item)

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        """Per request, up to `k` of the user's interactions strictly before it, best first."""
        k = check_k(k)
        if self.log is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(train, log) first")
        if k == 0:
            return [[] for _ in requests]
        histories = [self.log.before(r.user, r.ts) for r in requests]
        self._prepare(requests, histories)
        return [
            best_first(request, self._search(request, history, k), k) if history.size else []
            for request, history in zip(requests, histories, strict=True)
        ]

    @staticmethod
    def to_retrieved(hit: NodeWithScore, why: str) -> Retrieved:
        """A hit on one of our own interaction nodes as a `Retrieved`."""
        meta = hit.node.metadata
        return Retrieved(
            user=int(meta["user"]),
            item=int(meta["item"]),
            rating=float(meta["rating"]),
            ts=int(meta["ts"]),
            score=float(hit.score or 0.0),
            why=why,
        )

    # ------------------------------------------------------------------ for subclasses
    def _reset(self) -> None:
        """Forget indexes (a new log was fitted)."""

    def _prepare(self, requests: Sequence[Request], histories: Sequence[Events]) -> None:
        """Build whatever the batch needs at once (batched embedding)."""

    def _search(self, request: Request, history: Events, k: int) -> list[Retrieved]:
        """Up to `k` hits for one request whose history is non-empty."""
        raise NotImplementedError
