"""Classic baselines on a hand-made log small enough to score by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mhee_sdk.baselines import GCNScore, Logistic, Popularity, platt
from mhee_sdk.data.log import InteractionLog
from mhee_sdk.metrics import quality
from mhee_sdk.retrievers.gcn import GCNRetriever
from mhee_sdk.types import Request

# user, item, rating, ts: item 10 is loved, item 20 disliked, item 30 mixed; ts 1..8 are training
TRAIN = pd.DataFrame(
    [(1, 10, 5, 1), (2, 10, 4, 2), (3, 10, 5, 3), (1, 20, 1, 4), (2, 20, 2, 5), (3, 30, 4, 6), (1, 30, 2, 7),
     (2, 30, 3, 8)],
    columns=["user", "item", "rating", "ts"],
)  # fmt: skip
LATER = pd.DataFrame([(3, 20, 5, 9), (4, 10, 4, 10), (4, 20, 1, 11), (4, 30, 5, 12)], columns=TRAIN.columns)


def frame(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(label=(rows["rating"] >= 4).astype(int))


@pytest.fixture
def log() -> InteractionLog:
    return InteractionLog(pd.concat([TRAIN, LATER], ignore_index=True))


def requests(rows: pd.DataFrame, first_id: int = 100) -> list[Request]:
    labelled = frame(rows)
    return [Request(first_id + n, int(r.user), int(r.item), int(r.label), int(r.ts))
            for n, r in enumerate(labelled.itertuples())]  # fmt: skip


def test_popularity_by_hand_training_counts(log):
    # prior = 4 likes / 8 ratings = 0.5; smoothing m = 2: (likes + 1) / (count + 2)
    model = Popularity(smoothing=2.0, streaming=False).fit(frame(TRAIN), log)
    scores = model.score(requests(LATER))
    assert scores == pytest.approx([(0 + 1) / (2 + 2), (3 + 1) / (3 + 2), (0 + 1) / (2 + 2), (1 + 1) / (3 + 2)])


def test_streaming_popularity_counts_everything_strictly_before_the_request(log):
    model = Popularity(smoothing=2.0, streaming=True).fit(frame(TRAIN), log)
    # item 20 at ts 11 has seen ts 4, 5 (dislikes) and ts 9 (a like): (1 + 1) / (3 + 2)
    # item 30 at ts 12 has seen ts 6 (like), 7, 8: (1 + 1) / (3 + 2); the request's own rating is not counted
    scores = model.score(requests(LATER))
    assert scores == pytest.approx([(0 + 1) / (2 + 2), (3 + 1) / (3 + 2), (1 + 1) / (3 + 2), (1 + 1) / (3 + 2)])
    same_second = Request(999, 4, 20, 1, 9)  # a rating at ts 9 is not "before" a request at ts 9
    assert model.score([same_second])[0] == pytest.approx((0 + 1) / (2 + 2))


def test_popularity_metrics_by_hand(log):
    model = Popularity(smoothing=2.0, streaming=False).fit(frame(TRAIN), log)
    asked = requests(LATER)
    # scores 0.25, 0.8, 0.25, 0.4 for labels 1, 1, 0, 1: positives beat the negative in pairs
    # (0.25 vs 0.25: tie = 1/2), (0.8 > 0.25), (0.4 > 0.25) -> AUC = 2.5 / 3
    metrics = quality([r.label for r in asked], model.score(asked), [r.user for r in asked])
    assert metrics["auc"] == pytest.approx(2.5 / 3)
    # user 3 has one request (skipped); user 4: labels 1, 0, 1 with 0.8, 0.25, 0.4 -> AUC 1.0
    assert metrics["gauc"] == pytest.approx(1.0)


def test_logistic_learns_item_biases_and_profiles(log):
    users = pd.DataFrame({"user": [1, 2, 3, 4], "age": [20, 30, 40, 50], "gender": list("MFMF"),
                          "occupation": ["a", "b", "c", "d"]})  # fmt: skip
    items = pd.DataFrame({"item": [10, 20, 30], "genres": ["Drama", "Horror", "Drama, Horror"]})
    model = Logistic(c=10.0, users=users, items=items).fit(frame(TRAIN), log)
    scores = model.score(requests(LATER))
    assert scores[1] > scores[3] > scores[2]  # loved item 10 > mixed item 30 > disliked item 20 for user 4
    assert np.all((scores > 0) & (scores < 1))
    with pytest.raises(ValueError, match="users= and items="):
        Logistic().fit(frame(TRAIN), log)


def test_platt_keeps_the_order_and_calibrates():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    calibrate = platt(scores, labels)
    probs = calibrate(scores)
    assert np.all(np.diff(probs) > 0)  # monotone: AUC unchanged
    assert probs.mean() == pytest.approx(labels.mean(), abs=0.05)


def test_negative_smoothing_is_rejected():
    with pytest.raises(ValueError, match="smoothing=-1"):
        Popularity(smoothing=-1)


def test_gcn_score_reuses_the_experiments_lightgcn_only_when_it_is_the_same_fit(log):
    train, later = frame(TRAIN), requests(LATER)
    settings = dict(dim=8, epochs=3, progress=False)
    retriever = GCNRetriever(mode="users", **settings).fit(train, log)
    shared = GCNScore(retriever=retriever, **settings).fit(train, log)
    own = GCNScore(**settings).fit(train, log)
    assert shared.model is retriever and own.model is not retriever
    np.testing.assert_array_equal(shared.score(later), own.score(later))  # seeded training: sharing changes no score
    assert GCNScore(retriever=retriever, dim=8, epochs=4, progress=False).fit(train, log).model is not retriever
    fewer = train.iloc[:-3]  # drops the liked (3, 30) rating: another graph
    assert GCNScore(retriever=retriever, **settings).fit(fewer, log).model is not retriever
