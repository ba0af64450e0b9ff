"""Splits by time, and slices of requests by how much training data their user and item have.

Slices (what every report shows beside the overall metrics), for a threshold N (``RunConfig.cold_threshold``):

- ``cold_items``: requests whose item has fewer than N training interactions;
- ``cold_users``: requests whose user has fewer than N training interactions;
- ``light_users`` / ``medium_users`` / ``heavy_users``: requests of the other (warm) users, by terciles of
  their number of training interactions over all warm users in train (so the cut points belong to the
  dataset, not to the sample of requests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mhee_sdk.types import Request

SLICES = ("cold_items", "cold_users", "light_users", "medium_users", "heavy_users")


def describe_slices(metrics: Mapping[str, float]) -> str:
    """The slice rules in words from a run's stored cut points (:meth:`RequestSlices.cut_points`)."""
    n, medium, heavy = (metrics.get(k) for k in ("cold_threshold", "train_min@medium_users", "train_min@heavy_users"))
    if n is None or medium is None or heavy is None or any(v != v for v in (n, medium, heavy)):
        return "slices: not recorded for these runs"

    def span(low: float, high: float) -> str:
        return f"{low:.0f}-{high - 1:.0f}" if high - 1 > low else (f"{low:.0f}" if high - 1 == low else "none")

    return (
        f"cold: fewer than {n:.0f} training interactions; warm users by training interactions (terciles): "
        f"light {span(n, medium)}, medium {span(medium, heavy)}, heavy {heavy:.0f}+"
    )


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Train / valid / test shares as a tuple; raises unless they are three positive numbers summing to 1."""
    values = tuple(fractions)
    if len(values) != 3 or any(not isinstance(f, int | float) or f <= 0 for f in values) or abs(sum(values) - 1) > 1e-9:
        raise ValueError(f"fractions {fractions!r} must be three positive numbers summing to 1")
    return values


def temporal_split(ts: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split labels for time-sorted timestamps; a boundary never falls between equal timestamps."""
    fractions = check_fractions(fractions)
    if np.any(np.diff(ts) < 0):
        raise ValueError("timestamps must be sorted ascending")
    n = len(ts)
    cuts = [0]
    for fraction in np.cumsum(fractions)[:2]:
        cut = max(round(fraction * n), cuts[-1] + 1)
        # move the cut past every rating that shares the timestamp just before it
        cut = int(np.searchsorted(ts, ts[cut - 1], side="right")) if 0 < cut < n else cut
        cuts.append(cut)
    if not cuts[1] < cuts[2] < n:
        empty = "valid and test" if cuts[1] >= n else ("test" if cuts[2] >= n else "valid")
        raise ValueError(
            f"{n} interactions cannot be split {'/'.join(f'{f:g}' for f in fractions)} by time: {empty} would be "
            "empty (a boundary moves past interactions that share its timestamp); add interactions with later "
            "timestamps or change fractions"
        )
    cuts = cuts[1:]
    labels = np.empty(n, dtype=object)
    labels[: cuts[0]] = "train"
    labels[cuts[0] : cuts[1]] = "valid"
    labels[cuts[1] :] = "test"
    return labels


@dataclass(frozen=True)
class RequestSlices:
    """Training interactions per user and per item, and the slice rules above. Build with :meth:`from_train`."""

    user_counts: pd.Series  # training interactions by user id
    item_counts: pd.Series  # by item id
    threshold: int  # cold: fewer than this many
    medium_from: int  # warm users with at least this many training interactions are medium ...
    heavy_from: int  # ... and with at least this many, heavy

    @classmethod
    def from_train(cls, train: pd.DataFrame, threshold: int = 5) -> RequestSlices:
        """Count `train` interactions (columns user, item); `threshold` is N of the cold slices."""
        if not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"cold_threshold={threshold!r} must be a positive integer")
        users, items = train["user"].value_counts(), train["item"].value_counts()
        warm = users[users >= threshold].to_numpy()
        if len(warm):
            low, high = np.quantile(warm, [1 / 3, 2 / 3], method="higher")
        else:
            low = high = threshold
        medium_from = max(int(low), threshold)
        return cls(users, items, threshold, medium_from, max(int(high), medium_from))

    def cut_points(self) -> dict[str, float]:
        """The rules as numbers, stored with a run's metrics: ``cold_threshold`` and ``train_min@<slice>``."""
        return {"cold_threshold": float(self.threshold), "train_min@light_users": float(self.threshold),
                "train_min@medium_users": float(self.medium_from),
                "train_min@heavy_users": float(self.heavy_from)}  # fmt: skip

    def masks(self, requests: Sequence[Request]) -> dict[str, np.ndarray]:
        """Per slice (:data:`SLICES`), which requests belong to it (bool ``[N]``)."""
        users = np.array([r.user for r in requests], dtype=np.int64)
        items = np.array([r.item for r in requests], dtype=np.int64)
        return self.masks_of(users, items)

    def masks_of(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """The same for parallel arrays of user and item ids."""
        user_n = self.user_counts.reindex(users, fill_value=0).to_numpy()
        item_n = self.item_counts.reindex(items, fill_value=0).to_numpy()
        warm = user_n >= self.threshold
        return {
            "cold_items": item_n < self.threshold,
            "cold_users": ~warm,
            "light_users": warm & (user_n < self.medium_from),
            "medium_users": (user_n >= self.medium_from) & (user_n < self.heavy_from),
            "heavy_users": user_n >= self.heavy_from,
        }
