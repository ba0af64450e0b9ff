"""Quality and exit metrics: AUC (plain, weighted, by ranks), GAUC, LogLoss, accuracy, exit-layer statistics,
and the same quality on slices of the requests (``auc@cold_items``, ...; slices in ``mhee_sdk.data.split``).

Every AUC in the SDK comes from here: [`auc`][mhee_sdk.metrics.auc] (scikit-learn) for reports,
[`WeightedAUC`][mhee_sdk.metrics.WeightedAUC] for bootstrap resamples (calibration),
[`auc_of_ranks`][mhee_sdk.metrics.auc_of_ranks] for sweeps that score thousands of settings.
All count ties as half, so they agree to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

# scikit-learn is imported where used: the registry loads this module (via the policies) on every CLI start

if TYPE_CHECKING:
    from mhee_sdk.types import Prediction, Request


def auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of one score vector under each row of ``weights[B, N]`` (e.g. bootstrap counts), ties counted half."""
    return WeightedAUC(labels, weights)(scores)


class WeightedAUC:
    """Mann-Whitney AUC under B weightings of fixed labels: one sort of the negatives serves all B rows."""

    def __init__(self, labels: np.ndarray, weights: np.ndarray) -> None:
        self.positive = np.asarray(labels).astype(bool)
        weights = np.asarray(weights, dtype=np.float64)
        self.w_pos, self.w_neg = weights[:, self.positive], weights[:, ~self.positive]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.norm = 1.0 / (self.w_pos.sum(axis=1) * self.w_neg.sum(axis=1))  # inf: a one-class resample

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """``[B]`` AUCs of `scores` ``[N]``; NaN for a weighting with one class only."""
        scores = np.asarray(scores, dtype=np.float64)
        neg_scores, pos_scores = scores[~self.positive], scores[self.positive]
        order = np.argsort(neg_scores, kind="stable")
        cumulative = np.zeros((len(self.w_neg), len(order) + 1))
        np.cumsum(self.w_neg[:, order], axis=1, out=cumulative[:, 1:])  # weight of negatives up to each rank
        low = np.searchsorted(neg_scores[order], pos_scores, side="left")  # negatives strictly below
        high = np.searchsorted(neg_scores[order], pos_scores, side="right")  # ... plus those tied
        wins = (self.w_pos * (cumulative[:, low] + cumulative[:, high])).sum(axis=1) * 0.5
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(self.norm), wins * self.norm, np.nan)


def auc_of_ranks(ranks: np.ndarray, labels: np.ndarray, levels: int) -> float:
    """Mann-Whitney AUC of integer scores in ``[0, levels)`` (ties count half) by counting, not sorting."""
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    negative_count = np.bincount(ranks[~labels], minlength=levels)
    below = np.cumsum(negative_count) - negative_count  # negatives strictly below each rank
    mine = ranks[labels]
    return float((below[mine] + 0.5 * negative_count[mine]).sum() / (positives * negatives))


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank formula (ties count half); equals scikit-learn's, faster."""
    levels, ranks = np.unique(np.asarray(scores), return_inverse=True)
    return auc_of_ranks(ranks.ravel(), np.asarray(labels).astype(bool), len(levels))


def gauc(labels: Sequence[int], probs: Sequence[float], users: Sequence[int]) -> float:
    """Group AUC (as in DIN): per-user AUC averaged with weights = that user's number of requests.

    Users whose requests are all one class have no AUC and are skipped. NaN if no user qualifies.
    Each user's AUC is the Mann-Whitney statistic from mid-ranks within the user (ties count half,
    as in scikit-learn), computed for all users at once: a loop of `roc_auc_score` calls took seconds
    for a few hundred users, too slow for replaying policies in a widget.
    """
    frame = pd.DataFrame({"label": np.asarray(labels).astype(int), "prob": np.asarray(probs, dtype=np.float64),
                          "user": np.asarray(users)})  # fmt: skip
    ranks = frame.groupby("user", sort=False)["prob"].rank(method="average")
    frame["pos_rank"] = ranks.where(frame["label"] == 1, 0.0)
    by_user = frame.groupby("user", sort=False)
    per_user = by_user.agg(n=("label", "size"), pos=("label", "sum"), pos_rank=("pos_rank", "sum"))
    neg = per_user["n"] - per_user["pos"]
    both = (per_user["pos"] > 0) & (neg > 0)
    if not both.any():
        return float("nan")
    per_user, neg = per_user[both], neg[both]
    user_auc = (per_user["pos_rank"] - per_user["pos"] * (per_user["pos"] + 1) / 2) / (per_user["pos"] * neg)
    return float((user_auc * per_user["n"]).sum() / per_user["n"].sum())


def quality(labels: Sequence[int], probs: Sequence[float], users: Sequence[int]) -> dict[str, float]:
    """AUC, GAUC, LogLoss and accuracy (threshold 0.5) of probabilities."""
    from sklearn.metrics import accuracy_score, log_loss

    labels, probs = np.asarray(labels), np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    both = len(np.unique(labels)) == 2
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, users),
        "logloss": float(log_loss(labels, probs, labels=[0, 1])) if both else float("nan"),
        "accuracy": float(accuracy_score(labels, probs >= 0.5)),
        "requests": float(len(labels)),
    }


SLICE_METRICS = ("auc", "gauc", "logloss", "requests")


def slice_metric(metric: str, slice_name: str) -> str:
    """The stored name of a metric on a slice: ``auc@cold_items``."""
    return f"{metric}@{slice_name}"


def sliced_quality(
    labels: Sequence[int], probs: Sequence[float], users: Sequence[int], slices: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """AUC, GAUC, LogLoss and the number of requests on each slice (a bool mask over the requests).

    Names are ``{metric}@{slice}`` (see :data:`SLICE_METRICS`); a slice without requests gets NaN metrics
    and ``requests@... = 0``.
    """
    labels, probs, users = np.asarray(labels), np.asarray(probs, dtype=np.float64), np.asarray(users)
    out: dict[str, float] = {}
    for name, mask in slices.items():
        mask = np.asarray(mask, dtype=bool)
        if len(mask) != len(labels):
            raise ValueError(f"slice {name!r} has {len(mask)} rows for {len(labels)} requests")
        found = quality(labels[mask], probs[mask], users[mask]) if mask.any() else {}
        for metric in SLICE_METRICS:
            out[slice_metric(metric, name)] = found.get(metric, float("nan"))
        out[slice_metric("requests", name)] = float(mask.sum())
    return out


def summarize(
    labels: Sequence[int],
    probs: Sequence[float],
    users: Sequence[int],
    exit_layers: Sequence[int],
    num_layers: int,
) -> dict[str, float]:
    """Quality plus exit statistics as one flat dict.

    layer_savings is ``num_layers / mean exit layer``: the speedup an engine with no overhead would get.
    """
    exit_layers = np.asarray(exit_layers)
    return {
        **quality(labels, probs, users),
        "mean_exit_layer": float(exit_layers.mean()),
        "layer_savings": float(num_layers / exit_layers.mean()),
    }


def run_metrics(
    requests: Sequence[Request],
    predictions: Sequence[Prediction],
    num_layers: int,
    seconds: np.ndarray,
    full_depth_seconds: np.ndarray | None = None,
) -> dict[str, float]:
    """A live run's metrics: quality, exits, engine seconds, and the speedup over full depth when measured beside it.

    seconds / full_depth_seconds: per batch, measured side by side (``Experiment.run_many``); the speedup is
    their totals' ratio, and ``speedup_p25``/``speedup_p75`` the middle half of the per-batch ratios.
    """
    metrics = summarize([r.label for r in requests], [p.prob for p in predictions], [r.user for r in requests],
                        [p.exit_layer for p in predictions], num_layers)  # fmt: skip
    metrics["seconds"] = float(seconds.sum())
    metrics["requests_per_s"] = len(requests) / float(seconds.sum())
    if full_depth_seconds is not None:
        ratios = full_depth_seconds / seconds
        metrics["speedup"] = float(full_depth_seconds.sum() / seconds.sum())
        metrics["speedup_p25"], metrics["speedup_p75"] = (float(x) for x in np.percentile(ratios, [25, 75]))
    return metrics


def exit_histogram(exit_layers: Sequence[int]) -> dict[int, int]:
    """Number of requests that exited at each layer, by layer."""
    values, counts = np.unique(np.asarray(exit_layers), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}
