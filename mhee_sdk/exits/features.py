"""Collaborative evidence as numbers, for the ``hybrid`` exit head.

A 135M model reads "34 of 50 viewers liked it" poorly, so the hybrid head gets the same evidence the
prompt states in words as a small vector beside the hidden state. Every value uses only ratings
strictly before the request (the log) and models fitted on training data (the retriever).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mhee_sdk.data.log import InteractionLog, lowest_liked_rating
from mhee_sdk.interfaces import ItemEmbeddings, Retriever
from mhee_sdk.types import Request, Retrieved

FEATURE_NAMES = (
    "gcn_history_score",  # item embedding . mean embedding of items the user liked before; 0 without a GCN
    "item_like_rate",  # smoothed share of earlier ratings of the item that were likes (>= 4 on MovieLens)
    "item_ratings_log",  # log1p(number of earlier ratings of the item)
    "user_like_rate",  # smoothed share of the user's earlier ratings that were likes
    "user_ratings_log",  # log1p(number of the user's earlier ratings)
    "similar_users_rating",  # mean rating of the candidate by the retrieved other users, minus 3.5; 0 if none
    "similar_users_count_log",  # log1p(number of retrieved other users who rated the candidate)
)


class CollaborativeFeatures:
    """Computes :data:`FEATURE_NAMES` for requests and their retrieved evidence.

    A rating is a like at ``>= like_threshold``; None (default) takes the lowest rating labelled 1 in train.
    """

    def __init__(self, smoothing: float = 10.0, like_threshold: float | None = None) -> None:
        self.smoothing, self.like_threshold = smoothing, like_threshold

    @property
    def size(self) -> int:
        """Number of features."""
        return len(FEATURE_NAMES)

    def fit(
        self, train: pd.DataFrame, log: InteractionLog, retriever: Retriever | None = None
    ) -> CollaborativeFeatures:
        """Remember the log, the training like-rate prior and the (fitted) retriever's item embeddings, if any."""
        self.log, self.retriever = log, retriever
        # the one check of this optional capability: without item embeddings the GCN score is 0
        self.item_embeddings = retriever.item_embeddings if isinstance(retriever, ItemEmbeddings) else None
        self.prior = float(train["label"].mean())
        if self.like_threshold is None:
            self.like_threshold = lowest_liked_rating(train)
        return self

    def compute(self, requests: Sequence[Request], retrieved: Sequence[Sequence[Retrieved]]) -> np.ndarray:
        """``[N, F]`` float32 features, one row per request."""
        if len(requests) != len(retrieved):
            raise ValueError(f"{len(requests)} requests but {len(retrieved)} retrieved lists")
        embeddings = self.item_embeddings
        rows = []
        for request, evidence in zip(requests, retrieved, strict=True):
            item = self.log.raters(request.item, request.ts).rating
            history = self.log.before(request.user, request.ts)
            user = history.rating
            others = [r.rating for r in evidence if r.user != request.user and r.item == request.item]
            rows.append([
                self._history_score(embeddings, history.item[user >= self.like_threshold], request.item),
                self._rate(item), np.log1p(len(item)),
                self._rate(user), np.log1p(len(user)),
                np.mean(others) - 3.5 if others else 0.0, np.log1p(len(others)),
            ])  # fmt: skip
        return np.asarray(rows, dtype=np.float32)

    @staticmethod
    def _history_score(embeddings: np.ndarray | None, liked: np.ndarray, item: int) -> float:
        # The user side is always folded in from history strictly before the request, never the learned
        # user embedding: for training requests that embedding was fitted on the very rating being predicted.
        if embeddings is None or len(liked) == 0 or item >= len(embeddings):
            return 0.0
        liked = liked[liked < len(embeddings)]
        return float(embeddings[liked].mean(axis=0) @ embeddings[item]) if len(liked) else 0.0

    def embeddings(self, requests: Sequence[Request]) -> np.ndarray:
        """``[N, 2 * dim]`` GCN vectors per request: the user's fold-in (mean embedding of items liked
        strictly before the request) and the candidate item's embedding; input of collaborative soft tokens."""
        table = self.item_embeddings
        if table is None:
            raise ValueError("collaborative soft tokens need a retriever with item_embeddings (use retriever 'gcn')")
        out = np.zeros((len(requests), 2 * table.shape[1]), dtype=np.float32)
        for row, request in enumerate(requests):
            history = self.log.before(request.user, request.ts)
            liked = history.item[(history.rating >= self.like_threshold) & (history.item < len(table))]
            if len(liked):
                out[row, : table.shape[1]] = table[liked].mean(axis=0)
            if request.item < len(table):
                out[row, table.shape[1] :] = table[request.item]
        return out

    def _rate(self, ratings: np.ndarray) -> float:
        likes = float((ratings >= self.like_threshold).sum())
        return (likes + self.smoothing * self.prior) / (len(ratings) + self.smoothing)
