"""MovieLens-100K, read from the files `mhee assets install` extracts from the recbole wheel.

Split (documented in docs/concepts.md): all 100,000 ratings are ordered by time; the first 80% are
``train``, the next 10% ``valid``, the last 10% ``test``. Boundaries move forward past ties, so every
valid/test rating is strictly later than every train rating. Each rating is one request; its label
is 1 when the rating is >= 4. Evidence for a request comes only from strictly earlier ratings
([`InteractionLog`][mhee_sdk.data.log.InteractionLog]), and retrievers are fitted on ``train`` only.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from mhee_sdk import assets
from mhee_sdk.data.log import InteractionLog
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import SPLITS, DatasetTables
from mhee_sdk.types import Request


def temporal_split(ts: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split labels for time-sorted timestamps; a boundary never falls between equal timestamps."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions {fractions!r} must be three positive numbers summing to 1")
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
        raise ValueError(f"{n} timestamps cannot be split {fractions!r} with every split non-empty")
    cuts = cuts[1:]
    labels = np.empty(n, dtype=object)
    labels[: cuts[0]] = "train"
    labels[cuts[0] : cuts[1]] = "valid"
    labels[cuts[1] :] = "test"
    return labels


class MovieLens100K:
    """943 users, 1682 movies, 100,000 ratings with user age/gender/occupation and movie genres.

    Args:
        fractions: train/valid/test shares of the time-ordered ratings.
        like_threshold: ratings at or above it are positive (label 1).
    """

    name = "movielens-100k"

    def __init__(self, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), like_threshold: float = 4.0):
        self.fractions = tuple(fractions)
        self.like_threshold = like_threshold

    def load(self) -> DatasetTables:
        """Read the three files (cached on the instance)."""
        return self._tables

    @cached_property
    def _tables(self) -> DatasetTables:
        inter = pd.read_csv(assets.asset_file(assets.MOVIELENS, "ml-100k.inter"), sep="\t")
        inter.columns = ["user", "item", "rating", "ts"]
        inter = inter.astype({"user": np.int64, "item": np.int64, "rating": np.float64, "ts": np.int64})
        inter = inter.sort_values(["ts", "user", "item"], kind="stable").reset_index(drop=True)
        inter["label"] = (inter["rating"] >= self.like_threshold).astype(np.int64)
        inter["split"] = temporal_split(inter["ts"].to_numpy(), self.fractions)

        users = pd.read_csv(assets.asset_file(assets.MOVIELENS, "ml-100k.user"), sep="\t", dtype=str)
        users.columns = ["user", "age", "gender", "occupation", "zip"]
        users = users.astype({"user": np.int64, "age": np.int64})

        items = pd.read_csv(
            assets.asset_file(assets.MOVIELENS, "ml-100k.item"), sep="\t", dtype=str, keep_default_na=False
        )
        items.columns = ["item", "title", "year", "genres"]
        items["item"] = items["item"].astype(np.int64)
        items["genres"] = items["genres"].str.split().str.join(", ")
        return DatasetTables(interactions=inter, users=users, items=items)

    @cached_property
    def log(self) -> InteractionLog:
        """All ratings, for strictly-earlier look-ups."""
        return InteractionLog(self.load().interactions)

    def requests(self, split: str, limit: int | None = None, seed: int = 0) -> list[Request]:
        """Requests of `split` in time order; `limit` draws a seeded uniform sample of that size."""
        rows = self.load().split(split)
        if limit is not None:
            if limit <= 0:
                raise ValueError(f"limit must be a positive number of requests, got {limit!r}")
            if limit < len(rows):
                rng = np.random.default_rng(seed)
                rows = rows.iloc[np.sort(rng.choice(len(rows), size=limit, replace=False))]
        return [
            Request(request_id=int(i), user=int(u), item=int(it), label=int(y), ts=int(t))
            for i, u, it, y, t in zip(rows.index, rows["user"], rows["item"], rows["label"], rows["ts"], strict=True)
        ]


@hookimpl
def register_datasets(register) -> None:
    register("movielens-100k", MovieLens100K)


__all__ = ["SPLITS", "MovieLens100K", "temporal_split"]
