"""Classic recommenders the LLM must beat, scored on exactly the same requests.

Each has ``fit(train, log)`` and ``score(requests) -> [N]`` (higher = more likely liked). Like the
retrievers they see only training interactions and the log strictly before each request.
[`platt`][mhee_sdk.baselines.platt] turns any score into a calibrated probability (fit on validation
requests) so LogLoss is comparable too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import MultiLabelBinarizer, OneHotEncoder

from mhee_sdk.data.log import InteractionLog
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.types import Request


class Popularity:
    """Smoothed like-rate of the item: ``(likes + m * prior) / (ratings + m)``.

    With ``streaming=True`` (default) it counts every rating strictly before the request (what a live
    system knows); with False, only training ratings.
    """

    name = "popularity"

    def __init__(self, smoothing: float = 10.0, streaming: bool = True, like_threshold: float = 4.0) -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing={smoothing!r} must be >= 0")
        self.smoothing, self.streaming, self.like_threshold = smoothing, streaming, like_threshold

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Popularity:
        self.log = log
        self.prior = float(train["label"].mean())
        grouped = train.groupby("item")["label"].agg(["sum", "count"])
        self.likes, self.counts = grouped["sum"].to_dict(), grouped["count"].to_dict()
        return self

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        out = np.empty(len(requests))
        for n, request in enumerate(requests):
            if self.streaming:
                ratings = self.log.raters(request.item, request.ts).rating
                likes, count = float((ratings >= self.like_threshold).sum()), len(ratings)
            else:
                likes, count = self.likes.get(request.item, 0.0), self.counts.get(request.item, 0)
            out[n] = (likes + self.smoothing * self.prior) / (count + self.smoothing)
        return out


class GCNScore:
    """The LightGCN dot product of user and item embeddings (the retriever's own model, no LLM)."""

    name = "gcn-score"

    def __init__(self, **gcn_params: object) -> None:
        self.gcn_params = gcn_params

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> GCNScore:
        from mhee_sdk.retrievers.gcn import GCNRetriever

        self.model = GCNRetriever(**self.gcn_params).fit(train, log)
        return self

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        return np.asarray(self.model.score(requests), dtype=np.float64)


class Logistic:
    """Logistic regression on user and item one-hot biases, user age/gender/occupation and item genres."""

    name = "logistic"

    def __init__(self, c: float = 0.1, users: pd.DataFrame | None = None, items: pd.DataFrame | None = None) -> None:
        self.c, self.users, self.items = c, users, items

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Logistic:
        if self.users is None or self.items is None:
            raise ValueError("the logistic baseline needs users= and items= tables (Experiment passes them)")
        self.encoder = OneHotEncoder(handle_unknown="ignore")
        self.genres = MultiLabelBinarizer()
        categorical, genres = self._features(train["user"].to_numpy(), train["item"].to_numpy())
        x = sparse.hstack([self.encoder.fit_transform(categorical), self.genres.fit_transform(genres)]).tocsr()
        self.model = LogisticRegression(C=self.c, max_iter=2000).fit(x, train["label"].to_numpy())
        return self

    def _features(self, users: np.ndarray, items: np.ndarray) -> tuple[pd.DataFrame, list[list[str]]]:
        profile = self.users.set_index("user").reindex(users)
        genres = self.items.set_index("item")["genres"].reindex(items).fillna("")
        categorical = pd.DataFrame({
            "user": users.astype(str), "item": items.astype(str), "age": (profile["age"] // 10).astype(str),
            "gender": profile["gender"].astype(str), "occupation": profile["occupation"].astype(str),
        })  # fmt: skip
        return categorical, [g.split(", ") if g else [] for g in genres]

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        users = np.array([r.user for r in requests])
        items = np.array([r.item for r in requests])
        categorical, genres = self._features(users, items)
        x = sparse.hstack([self.encoder.transform(categorical), self.genres.transform(genres)]).tocsr()
        return self.model.predict_proba(x)[:, 1]


class CollaborativeLogistic:
    """The ``hybrid`` head's collaborative features alone (no LLM) in a logistic regression.

    The honest yardstick for the hybrid head: whatever the hybrid gains over this, the LLM's hidden
    state contributed. Trained on `train_requests` sampled training ratings with the same retriever.
    """

    name = "collab-logistic"

    def __init__(self, train_requests: int = 600, k: int = 10, seed: int = 0, retriever=None) -> None:
        self.train_requests, self.k, self.seed, self.retriever = train_requests, k, seed, retriever

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> CollaborativeLogistic:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from mhee_sdk.exits.features import CollaborativeFeatures
        from mhee_sdk.retrievers.gcn import GCNRetriever

        if self.retriever is None:
            self.retriever = GCNRetriever(mode="users", progress=False).fit(train, log)
        rows = train.sample(n=min(self.train_requests, len(train)), random_state=self.seed)
        requests = [
            Request(int(i), int(u), int(it), int(y), int(t))
            for i, u, it, y, t in zip(rows.index, rows["user"], rows["item"], rows["label"], rows["ts"], strict=True)
        ]
        self.features = CollaborativeFeatures().fit(train, log, self.retriever)
        x = self.features.compute(requests, self.retriever.retrieve(requests, self.k))
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.model.fit(x, rows["label"].to_numpy())
        return self

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        x = self.features.compute(requests, self.retriever.retrieve(requests, self.k))
        return self.model.predict_proba(x)[:, 1]


def platt(valid_scores: np.ndarray, valid_labels: np.ndarray):
    """A 1-D logistic calibration fitted on validation scores; returns ``scores -> probabilities``."""
    model = LogisticRegression().fit(np.asarray(valid_scores).reshape(-1, 1), np.asarray(valid_labels))
    return lambda scores: model.predict_proba(np.asarray(scores).reshape(-1, 1))[:, 1]


@hookimpl
def register_baselines(register) -> None:
    register("popularity", Popularity)
    register("gcn-score", GCNScore)
    register("logistic", Logistic)
    register("collab-logistic", CollaborativeLogistic)
