"""A made-up click log shaped like a shop's: text ids, float timestamps, 0/1 clicks, item titles and categories.

For tests, tutorial 05 and trying the pipeline on something that is not MovieLens. Users click items of
their favourite category more often, so the signal is learnable; users and items arrive over time and
activity is skewed, so the cold-start and activity slices all have members.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = ("kitchen", "garden", "books", "toys", "audio", "sports")
_ADJECTIVES = ("blue", "compact", "classic", "smart", "wooden", "quiet", "large", "travel", "deluxe", "mini")
_NOUNS = {
    "kitchen": ("kettle", "pan", "knife set", "toaster"),
    "garden": ("hose", "rake", "planter", "lantern"),
    "books": ("novel", "cookbook", "atlas", "comic"),
    "toys": ("puzzle", "robot", "kite", "train set"),
    "audio": ("speaker", "headphones", "radio", "turntable"),
    "sports": ("ball", "yoga mat", "racket", "bottle"),
}


def synthetic_clicks(users: int = 200, items: int = 400, events: int = 4000, seed: int = 0) -> pd.DataFrame:
    """One row per impression: ``visitor, sku, time, clicked, title, category, country``, in random order."""
    rng = np.random.default_rng(seed)
    visitor = np.array([f"v{n:04d}" for n in range(users)], dtype=object)
    favourite = rng.integers(len(CATEGORIES), size=users)
    country = rng.choice(["DE", "FR", "NL", "PL"], size=users)
    category = rng.integers(len(CATEGORIES), size=items)
    titles = [f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS[CATEGORIES[c]])}".capitalize() for c in category]
    start = 1_700_000_000.0
    span = 90 * 86_400.0
    user_arrives = rng.uniform(0, 0.97, size=users) * span  # later users: cold in valid/test
    item_arrives = rng.uniform(0, 0.97, size=items) * span
    user_weight = rng.pareto(1.5, size=users) + 0.2  # a few heavy users, many light ones
    item_weight = rng.pareto(1.2, size=items) + 0.2
    who = rng.choice(users, size=events, p=user_weight / user_weight.sum())
    what = rng.choice(items, size=events, p=item_weight / item_weight.sum())
    earliest = np.maximum(user_arrives[who], item_arrives[what])
    when = start + earliest + rng.uniform(0, 1, size=events) * (span - earliest)
    likes = category[what] == favourite[who]
    clicked = (rng.uniform(size=events) < np.where(likes, 0.6, 0.15)).astype(int)
    return pd.DataFrame({
        "visitor": visitor[who], "sku": [f"sku-{n:04d}" for n in what], "time": np.round(when, 3),
        "clicked": clicked, "title": np.array(titles, dtype=object)[what],
        "category": np.array(CATEGORIES)[category[what]], "country": country[who],
    })  # fmt: skip
