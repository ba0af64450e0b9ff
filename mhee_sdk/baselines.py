"""Classic recommenders the LLM must beat, scored on exactly the same requests.

Each has ``fit(train, log)`` and ``score(requests) -> [N]`` (higher = more likely liked). Like the
retrievers they see only training interactions and the log strictly before each request.
[`platt`][mhee_sdk.baselines.platt] turns any score into a calibrated probability (fit on validation
requests) so LogLoss is comparable too.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mhee_sdk.data.log import InteractionLog, lowest_liked_rating
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import Baseline, Retriever, require
from mhee_sdk.metrics import quality
from mhee_sdk.types import Prediction, Request

if TYPE_CHECKING:
    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.runs import RunResult
    from mhee_sdk.store import Store

# scipy and scikit-learn are imported where used: the registry loads this module on every CLI start


class Popularity:
    """Smoothed like-rate of the item: ``(likes + m * prior) / (ratings + m)``.

    With ``streaming=True`` (default) it counts every rating strictly before the request (what a live
    system knows); with False, only training ratings. A rating is a like at ``>= like_threshold``;
    None (default) takes the lowest rating labelled 1 in train (4 on MovieLens, 1 for 0/1 clicks).
    """

    name = "popularity"

    def __init__(self, smoothing: float = 10.0, streaming: bool = True, like_threshold: float | None = None) -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing={smoothing!r} must be >= 0")
        self.smoothing, self.streaming, self.like_threshold = smoothing, streaming, like_threshold

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Popularity:
        self.log = log
        if self.like_threshold is None:
            self.like_threshold = lowest_liked_rating(train)
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

    def __init__(self, retriever: Retriever | None = None, **gcn_params: object) -> None:
        """`gcn_params` are :class:`~mhee_sdk.retrievers.gcn.GCNRetriever`'s; a wrong one fails here, before any fit.

        retriever: the experiment's fitted retriever; when it is the same LightGCN, fitted on the same
        ratings (see ``GCNRetriever.same_fit``), its embeddings are used instead of training them again.
        """
        from mhee_sdk.retrievers.gcn import GCNRetriever

        self.model = GCNRetriever(**gcn_params)
        self.offered = retriever if isinstance(retriever, GCNRetriever) else None

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> GCNScore:
        if self.offered is not None and self.model.same_fit(self.offered, train, log):
            self.model = self.offered  # scoring only reads it (and fills its lazy per-user cache)
        else:
            self.model.fit(train, log)
        return self

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        return np.asarray(self.model.score(requests), dtype=np.float64)


class Logistic:
    """Logistic regression on user and item one-hot biases, plus user age/gender/occupation and item genres.

    The profile features are MovieLens' columns, used when the tables have them; on other data the model
    keeps the user and item biases (add your own baseline through ``register_baselines`` for more).
    """

    name = "logistic"

    def __init__(self, c: float = 0.1, users: pd.DataFrame | None = None, items: pd.DataFrame | None = None) -> None:
        self.c, self.users, self.items = c, users, items

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> Logistic:
        from scipy import sparse
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import MultiLabelBinarizer, OneHotEncoder

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
        categorical = pd.DataFrame({"user": users.astype(str), "item": items.astype(str)})
        if "age" in profile and pd.api.types.is_numeric_dtype(profile["age"]):
            categorical["age"] = (profile["age"] // 10).astype(str).to_numpy()
        for column in ("gender", "occupation"):
            if column in profile:
                categorical[column] = profile[column].astype(str).to_numpy()
        if "genres" not in self.items:
            return categorical, [[] for _ in items]
        genres = self.items.set_index("item")["genres"].reindex(items).fillna("")
        return categorical, [g.split(", ") if g else [] for g in genres]

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        from scipy import sparse

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
        from sklearn.linear_model import LogisticRegression
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
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.asarray(valid_scores).reshape(-1, 1), np.asarray(valid_labels))
    return lambda scores: model.predict_proba(np.asarray(scores).reshape(-1, 1))[:, 1]


def score_baseline(
    experiment: Experiment, name: str, params: dict[str, Any], store: Store | None, requests: Sequence[Request]
) -> RunResult:
    """Fit baseline `name` on the experiment's train split, calibrate on its valid sample, score `requests`."""
    import pandas as pd

    from mhee_sdk.runs import RunResult

    entry, implied = experiment.registry.get("baseline", name)
    accepted = inspect.signature(entry.factory).parameters
    c = experiment.config  # what an experiment can hand a baseline; each gets the ones its factory names
    offered = {"users": experiment.tables.users, "items": experiment.tables.items, "retriever": experiment.retriever,
               "train_requests": c.train_requests, "k": c.k, "seed": c.seed}  # fmt: skip
    extras = {k: v for k, v in offered.items() if k in accepted and k not in params}
    baseline = entry.factory(**implied, **extras, **params)
    require(baseline, Baseline, f"baseline {name!r}:")
    started = time.perf_counter()
    baseline.fit(experiment.tables.split("train"), experiment.dataset.log)
    valid = experiment.dataset.requests("valid", limit=c.valid_requests, seed=c.seed)
    calibrate = platt(baseline.score(valid), [r.label for r in valid])
    probs = calibrate(baseline.score(requests))
    seconds = time.perf_counter() - started
    metrics = quality([r.label for r in requests], probs, [r.user for r in requests])
    metrics.update(experiment.slice_metrics(requests, probs))
    predictions = [Prediction(r.request_id, float(p), 0, (), 0.0) for r, p in zip(requests, probs, strict=True)]
    run_id = None
    if store is not None:
        config = {"baseline": name, "baseline_params": params, "dataset": c.dataset,
                  "dataset_params": c.describe("dataset_params"), "split": c.split, "seed": c.seed,
                  "cold_threshold": c.cold_threshold}  # fmt: skip
        with store.recording(config, [], 0, name=name, kind="baseline",
                             requests_key=experiment.requests_key(requests)) as run_id:  # fmt: skip
            store.append_batch(run_id, {"predictions": pd.DataFrame({
                "request_id": [r.request_id for r in requests], "user": [r.user for r in requests],
                "item": [r.item for r in requests], "label": [r.label for r in requests], "prob": probs,
                "exit_layer": 0, "latency_s": seconds / len(requests)})})  # fmt: skip
            store.add_metrics(run_id, metrics)
            store.add_timing(run_id, "fit+score", seconds, len(requests))
    return RunResult(name, run_id, predictions, metrics, seconds)


@hookimpl
def register_baselines(register) -> None:
    register("popularity", Popularity)
    register("gcn-score", GCNScore)
    register("logistic", Logistic)
    register("collab-logistic", CollaborativeLogistic)
