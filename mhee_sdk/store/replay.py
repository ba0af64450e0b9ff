"""Scoring exit policies on a logged full-depth run, without the model.

A full-depth run logged every exit head's output for every request, and a policy decides from those
outputs alone, so replaying it over the run's matrix ``probs [N, L]`` gives exactly the exits and
predictions a live run of it gives (see docs/concepts.md, "Offline replay equals live").

A policy comes as an object or as a registered name with parameters; a sweep by name varies the one
parameter given as a list. A policy that must calibrate first cannot be replayed from the store alone:
calibration needs validation outputs, which a store does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mhee_sdk.exits.policies import replay as replay_policy
from mhee_sdk.interfaces import CalibratedPolicy, ExitPolicy, require
from mhee_sdk.metrics import auc_of_ranks, summarize


@dataclass(frozen=True)
class ReplayResult:
    """A policy replayed over a logged full-depth run: per-request exits and the run's metrics."""

    predictions: pd.DataFrame  # request_id, user, label, prob, exit_layer
    metrics: dict[str, float]


_GRID = (list, tuple, range, np.ndarray)  # a parameter given as one of these is the grid of a sweep


def grid(params: Mapping[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """The parameter a sweep varies (the one given as a list; None if none is) and one parameter dict per setting."""
    varying = [name for name, value in params.items() if isinstance(value, _GRID)]
    if len(varying) > 1:
        raise ValueError(
            f"a sweep varies one parameter, but {', '.join(varying)} are all lists; give all but one a single "
            "value, or pass a list of policy objects"
        )
    if not varying:
        return None, [dict(params)]
    name = varying[0]
    values = params[name].tolist() if isinstance(params[name], np.ndarray) else list(params[name])
    if not values:
        raise ValueError(f"{name}=[] gives a sweep nothing to replay; list the values to try")
    return name, [{**params, name: value} for value in values]


def replayable(policy: ExitPolicy) -> ExitPolicy:
    """`policy`, checked: an exit policy that can decide from a logged run alone."""
    require(policy, ExitPolicy, "exit policy")
    if isinstance(policy, CalibratedPolicy) and not policy.is_calibrated:
        fitted = ", ".join(f"{param}=..." for param in policy.calibrated_params())
        raise ValueError(
            f"policy {policy.name!r} is not calibrated, and calibrating needs validation outputs, which the store "
            f"does not hold; pass a calibrated object (Experiment.make_policy({policy.name!r}) calibrates one) or "
            f"its calibrated parameters ({fitted}, as a run of it stores them in its config's policy_params)"
        )
    return policy


def replay_matrix(
    policy: ExitPolicy, preds: pd.DataFrame, layers: Sequence[int], probs: np.ndarray, num_layers: int
) -> ReplayResult:
    """Replay `policy` over a run's ``probs [N, L]`` (rows in the order of `preds`) with every metric."""
    result = replay_policy(policy, probs, layers)
    frame = pd.DataFrame(
        {
            "request_id": preds["request_id"].to_numpy(),
            "user": preds["user"].to_numpy(),
            "label": preds["label"].to_numpy(),
            "prob": result.prob,
            "exit_layer": result.layer,
        }
    )
    metrics = summarize(frame["label"], frame["prob"], frame["user"], frame["exit_layer"], num_layers)
    return ReplayResult(predictions=frame, metrics=metrics)


def dense_ranks(probs: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ranks of every logged output (equal probs share a rank) and the number of distinct levels."""
    levels, inverse = np.unique(probs, return_inverse=True)
    return inverse.reshape(probs.shape), len(levels)


def sweep_matrix(
    policies: Sequence[ExitPolicy],
    labels: np.ndarray,
    layers: Sequence[int],
    probs: np.ndarray,
    ranks: tuple[np.ndarray, int],
    num_layers: int,
) -> pd.DataFrame:
    """One row per policy: AUC, mean exit layer and layer savings, from the run's :func:`dense_ranks`.

    Every exit prob is one of the run's logged outputs, so each setting's AUC is a counting pass over
    their ranks, no sort.
    """
    ranks_of, levels = ranks
    rows = np.arange(len(probs))
    out = []
    for policy in policies:
        result = replay_policy(policy, probs, layers)
        mean_layer = float(result.layer.mean())
        out.append(
            {
                "policy": policy,
                "auc": auc_of_ranks(ranks_of[rows, result.index], labels, levels),
                "mean_exit_layer": mean_layer,
                "layer_savings": num_layers / mean_layer,
            }
        )
    return pd.DataFrame(out)
