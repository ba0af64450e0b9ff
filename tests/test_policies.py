from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mhee_sdk.exits.policies import (
    Calibrated,
    Entropy,
    FixedLayer,
    Margin,
    MaxProb,
    MultiHead,
    Never,
    Patience,
    replay,
)
from mhee_sdk.metrics import weighted_auc

LAYERS = [3, 6, 9, 12]
# rows: confident-early, flip-flopping, confident-late, unsure
PROBS = np.array(
    [
        [0.95, 0.96, 0.97, 0.98],
        [0.90, 0.10, 0.90, 0.10],
        [0.55, 0.60, 0.92, 0.95],
        [0.49, 0.52, 0.48, 0.51],
    ]
)


def exits(policy):
    return replay(policy, PROBS, LAYERS).layer.tolist()


def test_never_and_fixed_layer():
    assert exits(Never()) == [12, 12, 12, 12]
    assert exits(FixedLayer(layer=6)) == [6, 6, 6, 6]
    assert exits(FixedLayer(layer=7)) == [9, 9, 9, 9]  # first exit layer at or after 7


def test_confidence_policies():
    assert exits(MaxProb(threshold=0.9)) == [3, 3, 9, 12]
    assert exits(MaxProb(threshold=0.96)) == [6, 12, 12, 12]
    # entropy of p=0.9 is 0.469 bits; of 0.95, 0.286
    assert exits(Entropy(threshold=0.47)) == [3, 3, 9, 12]
    assert exits(Entropy(threshold=0.3)) == [3, 12, 12, 12]
    assert exits(Margin(threshold=0.8)) == [3, 3, 9, 12]  # |2p - 1| >= 0.8  <=>  max(p, 1-p) >= 0.9


def test_patience_needs_agreeing_heads():
    assert exits(Patience(patience=1)) == [6, 12, 6, 12]
    assert exits(Patience(patience=2)) == [9, 12, 9, 12]


def test_multi_head_ratio_and_stability():
    # ratio 9 means max/min >= 9, i.e. confidence >= 0.9; window 2: the last two heads agree
    assert exits(MultiHead(ratio=9.0, window=2)) == [6, 12, 9, 12]
    assert exits(MultiHead(ratio=9.0, window=1)) == [3, 3, 9, 12]
    assert exits(MultiHead(ratio=1.0, window=3)) == [9, 12, 9, 12]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MaxProb(threshold=1.5), r"threshold=1.5 is outside \[0.5, 1.0\]"),
        (lambda: Patience(patience=0), "patience=0 must be >= 1"),
        (lambda: MultiHead(ratio=0.5), "ratio=0.5 must be >= 1"),
        (lambda: FixedLayer(layer=0), "layer=0 must be"),
    ],
)
def test_bad_parameters_are_named(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def synthetic_run(n=4000, seed=0):
    """Heads that get more accurate with depth, like real exit heads."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signal = (2 * labels - 1)[:, None] * np.linspace(0.3, 2.0, 10)[None, :]
    logits = signal + rng.normal(0, 1.0, (n, 10))
    return 1 / (1 + np.exp(-logits)), labels, [3 * (j + 1) for j in range(10)]


def test_calibrated_stays_within_budget_on_its_data_and_exits_early():
    probs, labels, layers = synthetic_run()
    policy = Calibrated(budget=0.01).calibrate(probs, labels, layers)
    result = replay(policy, probs, layers)
    full = roc_auc_score(labels, probs[:, -1])
    assert full - roc_auc_score(labels, result.prob) <= 0.01
    assert result.layer.mean() < 27  # it really exits early somewhere
    strict = Calibrated(budget=0.0).calibrate(probs, labels, layers)
    assert replay(strict, probs, layers).layer.mean() >= result.layer.mean()


def test_calibrate_validates_shapes():
    with pytest.raises(ValueError, match=r"probs must be \[N, L\] = \[2, 4\]"):
        Calibrated().calibrate(np.zeros((2, 3)), np.array([0, 1]), LAYERS)


def test_replay_sweep_is_fast():
    probs, _, layers = synthetic_run(n=5000)
    started = time.perf_counter()
    for threshold in np.linspace(0.5, 1.0, 1000):
        replay(MaxProb(threshold=float(threshold)), probs, layers)
    assert time.perf_counter() - started < 5.0  # generous bound for slow CI; typically ~0.3 s


def test_weighted_auc_matches_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.integers(0, 2, 300)
    weights = rng.multinomial(300, np.full(300, 1 / 300), size=5)
    got = weighted_auc(scores, labels, np.vstack([np.ones(300), weights]))
    assert got[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for row, w in zip(got[1:], weights, strict=True):
        assert row == pytest.approx(roc_auc_score(labels, scores, sample_weight=w), abs=1e-12)


def test_bootstrap_calibration_is_more_cautious_than_the_point_estimate():
    probs, labels, layers = synthetic_run(n=300)  # a small validation set: the point estimate is noisy
    point = Calibrated(budget=0.01, resamples=0).calibrate(probs, labels, layers)
    bounded = Calibrated(budget=0.01, confidence=0.9).calibrate(probs, labels, layers)
    assert replay(bounded, probs, layers).layer.mean() > replay(point, probs, layers).layer.mean()
    again = Calibrated(budget=0.01, confidence=0.9).calibrate(probs, labels, layers)
    assert again.thresholds == bounded.thresholds  # seeded resamples: the same thresholds every time


@pytest.mark.parametrize("params", [{"confidence": 0.2}, {"resamples": -1}, {"budget": 2.0}])
def test_calibrated_rejects_bad_parameters(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        Calibrated(**params)
