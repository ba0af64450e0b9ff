from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mhee_sdk.metrics import auc, exit_histogram, gauc, sliced_quality, summarize


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auc([1, 0, 1, 0], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_gauc_weights_users_by_requests_and_skips_one_class_users():
    labels = [1, 0, 1, 0, 0, 1, 1]
    probs = [0.9, 0.1, 0.2, 0.8, 0.3, 0.5, 0.6]
    users = [1, 1, 2, 2, 2, 3, 3]
    # user 1: AUC 1.0 (2 requests); user 2: positive 0.2 vs negatives 0.8, 0.3 -> 0.0 (3 requests); user 3 skipped
    assert gauc(labels, probs, users) == pytest.approx((2 * 1.0 + 3 * 0.0) / 5)


def test_summarize_by_hand():
    m = summarize([1, 0], [0.8, 0.4], [1, 1], [6, 30], num_layers=30)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0
    assert m["logloss"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert m["mean_exit_layer"] == 18 and m["layer_savings"] == pytest.approx(30 / 18)
    assert exit_histogram([6, 30, 6]) == {6: 2, 30: 1}


def test_gauc_equals_a_loop_of_scikit_learn_aucs_with_ties():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 600)
    labels = rng.integers(0, 2, 600)
    probs = np.round(rng.random(600), 1)  # ties within users
    expected_total = expected_weight = 0.0
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) == 2:
            expected_total += mine.sum() * roc_auc_score(labels[mine], probs[mine])
            expected_weight += mine.sum()
    assert gauc(labels, probs, users) == pytest.approx(expected_total / expected_weight, abs=1e-12)
    assert math.isnan(gauc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2]))


def test_sliced_quality_by_hand():
    labels, probs, users = [1, 0, 1, 0, 1], [0.9, 0.5, 0.4, 0.1, 0.7], [1, 1, 2, 2, 3]
    slices = {"first": np.array([1, 1, 1, 1, 0], bool), "last": np.array([0, 0, 0, 0, 1], bool),
              "none": np.zeros(5, bool)}  # fmt: skip
    m = sliced_quality(labels, probs, users, slices)
    assert m["auc@first"] == pytest.approx(0.75) and m["requests@first"] == 4
    assert m["gauc@first"] == pytest.approx(1.0)  # each user ranks its own pair right
    assert m["logloss@first"] == pytest.approx(-np.mean(np.log([0.9, 0.5, 0.4, 0.9])))
    assert math.isnan(m["auc@last"]) and m["requests@last"] == 1  # one class: no AUC
    assert math.isnan(m["logloss@none"]) and m["requests@none"] == 0
    with pytest.raises(ValueError, match="slice 'bad' has 2 rows for 5 requests"):
        sliced_quality(labels, probs, users, {"bad": np.ones(2, bool)})
