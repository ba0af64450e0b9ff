"""Quality and exit metrics: AUC, GAUC, LogLoss, accuracy, exit-layer statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score


def auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


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
    labels, probs = np.asarray(labels), np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    both = len(np.unique(labels)) == 2
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, users),
        "logloss": float(log_loss(labels, probs, labels=[0, 1])) if both else float("nan"),
        "accuracy": float(accuracy_score(labels, probs >= 0.5)),
        "requests": float(len(labels)),
    }


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


def exit_histogram(exit_layers: Sequence[int]) -> dict[int, int]:
    """Number of requests that exited at each layer, by layer."""
    values, counts = np.unique(np.asarray(exit_layers), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}
