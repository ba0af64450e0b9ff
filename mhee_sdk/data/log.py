"""The interaction log: answers "what happened before time ts" and nothing later."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd


class Events(NamedTuple):
    """Parallel arrays of interactions, oldest first."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray

    @property
    def size(self) -> int:
        """Number of events."""
        return len(self.ts)

    def last(self, k: int) -> Events:
        """The `k` most recent events."""
        return Events(*(column[max(len(self.ts) - k, 0) :] for column in self))


class _Index:
    """Events grouped by one key column (user or item), time-ordered within each key."""

    def __init__(self, frame: pd.DataFrame, key: str) -> None:
        frame = frame.sort_values([key, "ts", "user", "item"], kind="stable")
        keys = frame[key].to_numpy()
        self.size = int(keys.max()) + 1 if len(keys) else 1
        counts = np.bincount(keys, minlength=self.size)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.columns = Events(
            frame["user"].to_numpy(np.int64),
            frame["item"].to_numpy(np.int64),
            frame["rating"].to_numpy(np.float64),
            frame["ts"].to_numpy(np.int64),
        )

    def before(self, key: int, ts: int) -> Events:
        if key < 0 or key >= self.size:
            return Events(*(column[:0] for column in self.columns))
        start, stop = self.offsets[key], self.offsets[key + 1]
        stop = start + int(np.searchsorted(self.columns.ts[start:stop], ts, side="left"))
        return Events(*(column[start:stop] for column in self.columns))


class InteractionLog:
    """All interactions, for strictly-earlier look-ups by user or by item.

    A request at time ``ts`` may use every interaction with a timestamp ``< ts`` (ratings at the
    same second are excluded, since their order is unknown): that is what a live system would know.
    """

    def __init__(self, interactions: pd.DataFrame) -> None:
        columns = interactions[["user", "item", "rating", "ts"]]
        self._by_user = _Index(columns, "user")
        self._by_item = _Index(columns, "item")
        self.num_events = len(columns)

    def by_user(self) -> Events:
        """Every interaction, grouped by user (ascending) and time-ordered within each user."""
        return self._by_user.columns

    def before(self, user: int, ts: int) -> Events:
        """The user's interactions strictly before `ts`, oldest first."""
        return self._by_user.before(int(user), int(ts))

    def raters(self, item: int, ts: int) -> Events:
        """Everyone's interactions with `item` strictly before `ts`, oldest first."""
        return self._by_item.before(int(item), int(ts))


def lowest_liked_rating(train: pd.DataFrame) -> float:
    """The lowest rating labelled 1 in `train`: which ratings in the log are likes (4 on MovieLens, 1 for clicks)."""
    liked = train.loc[train["label"] == 1, "rating"]
    if liked.empty:
        raise ValueError("train has no liked interactions (label 1); nothing to learn a like rate from")
    return float(liked.min())
