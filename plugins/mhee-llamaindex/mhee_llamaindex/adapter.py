"""Any LlamaIndex retriever as an mhee-sdk `Retriever`: bring your own index from a notebook.

The wrapped retriever is queried with the candidate's text (title, year, genres). Its nodes must carry
the item id in metadata. Nodes that are interactions also carry user, rating and ts; for nodes that
are items (a catalogue index), set those keys to None and each hit is looked up in the log as the
user's latest rating of that item strictly before the request. Either way, hits at or after the
request's timestamp are dropped, and so (unless ``same_user=False``) are other users' interactions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore

from mhee_llamaindex.nodes import best_first, item_texts, load_items, metadata_value
from mhee_sdk.data.log import InteractionLog
from mhee_sdk.retrievers.simple import check_k
from mhee_sdk.types import Request, Retrieved


class LlamaIndexRetriever:
    """Wraps a LlamaIndex ``BaseRetriever`` whose nodes carry item ids (and optionally user, rating, ts).

    Args:
        retriever: e.g. ``index.as_retriever(similarity_top_k=50)``; fetch more than `k`, since hits
            at or after the request (or of other users) are dropped before the top `k` are kept.
        item_key, user_key, rating_key, ts_key: metadata keys; set user/rating/ts to None when nodes
            are items rather than interactions.
        same_user: keep only the request user's interactions (False admits other users' earlier ones).
        items: item, title, year, genres for the query text (default: MovieLens-100K's).
        label: the word before the score in `Retrieved.why`.
    """

    name = "llamaindex-adapter"

    def __init__(
        self,
        retriever: BaseRetriever,
        item_key: str = "item",
        user_key: str | None = "user",
        rating_key: str | None = "rating",
        ts_key: str | None = "ts",
        same_user: bool = True,
        items: pd.DataFrame | None = None,
        label: str = "llamaindex",
    ) -> None:
        if not isinstance(retriever, BaseRetriever):
            raise TypeError(
                "retriever must be a LlamaIndex BaseRetriever (e.g. index.as_retriever()), "
                f"got {type(retriever).__name__}"
            )
        for key_name, key in [("user_key", user_key), ("rating_key", rating_key), ("ts_key", ts_key)]:
            if key is not None and not (isinstance(key, str) and key):
                raise ValueError(f"{key_name}={key!r} must be a metadata key or None")
        if not (isinstance(item_key, str) and item_key):
            raise ValueError(f"item_key={item_key!r} must be a metadata key")
        self.retriever = retriever
        self.item_key = item_key
        self.keys = (user_key, rating_key, ts_key)
        self.same_user = same_user
        self.items = items if items is None else load_items(items)
        self.label = label
        self.log: InteractionLog | None = None
        self._item_text: Callable[[int], str] | None = None

    @property
    def nodes_are_interactions(self) -> bool:
        """True when user, rating and ts come from node metadata, False when they come from the log."""
        return all(key is not None for key in self.keys)

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> LlamaIndexRetriever:
        """Keep `log` (to resolve item nodes) and the item texts; the wrapped index is the user's own."""
        if not callable(getattr(log, "before", None)):
            raise TypeError(f"LlamaIndexRetriever.fit needs an InteractionLog, got {type(log).__name__}")
        self.log = log
        if self._item_text is None:
            self._item_text = item_texts(load_items(self.items))
        return self

    def retrieve(self, requests: Sequence[Request], k: int) -> list[list[Retrieved]]:
        """Per request, the wrapped retriever's hits strictly before it, best first, at most `k`."""
        k = check_k(k)
        if self.log is None or self._item_text is None:
            raise RuntimeError("LlamaIndexRetriever is not fitted; call fit(train, log) first")
        if k == 0:
            return [[] for _ in requests]
        out = []
        for request in requests:
            hits = self.retriever.retrieve(self._item_text(request.item))
            found = self._interactions(hits) if self.nodes_are_interactions else self._from_log(request, hits)
            out.append(best_first(request, found, k, same_user=self.same_user))
        return out

    def _why(self, hit: NodeWithScore) -> str:
        return f"{self.label} {float(hit.score or 0.0):.2f}"

    def _interactions(self, hits: Sequence[NodeWithScore]) -> list[Retrieved]:
        user_key, rating_key, ts_key = self.keys
        hint = "set user_key, rating_key and ts_key to None if the nodes are items, not interactions"
        return [
            Retrieved(
                user=metadata_value(hit.node, user_key, int, hint),
                item=metadata_value(hit.node, self.item_key, int),
                rating=metadata_value(hit.node, rating_key, float, hint),
                ts=metadata_value(hit.node, ts_key, int, hint),
                score=float(hit.score or 0.0),
                why=self._why(hit),
            )
            for hit in hits
        ]

    def _from_log(self, request: Request, hits: Sequence[NodeWithScore]) -> list[Retrieved]:
        assert self.log is not None
        history = self.log.before(request.user, request.ts)
        latest = {int(i): (float(r), int(t)) for i, r, t in zip(history.item, history.rating, history.ts, strict=True)}
        found: dict[int, Retrieved] = {}
        for hit in hits:
            item = metadata_value(hit.node, self.item_key, int)
            score = float(hit.score or 0.0)
            if item in latest and (item not in found or score > found[item].score):  # an item's best hit
                rating, ts = latest[item]
                found[item] = Retrieved(request.user, item, rating, ts, score, self._why(hit))
        return list(found.values())
