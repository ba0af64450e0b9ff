"""`mhee data check`: load a log exactly as a run would, and summarize it (or stop at its first problem).

The checks are the loader's own (:class:`~mhee_sdk.data.interactions.InteractionsDataset`), so a file that
passes here loads in an ``Experiment``, and one that fails gives the same one-line message in both.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mhee_sdk.data.interactions import InteractionsDataset
from mhee_sdk.data.prompt import PromptBuilder, PromptTemplate
from mhee_sdk.data.source import DataWarning
from mhee_sdk.data.split import RequestSlices
from mhee_sdk.interfaces import SPLITS, Dataset, TemplatedDataset


@dataclass(frozen=True)
class DataSummary:
    """What :func:`check_log` found: sizes, time range, like rate, splits, cold-start shares, warnings."""

    source: str
    users: int
    items: int
    interactions: int
    first_time: str
    last_time: str
    like_rate: float
    splits: dict[str, int]
    split_starts: dict[str, str]  # the earliest time in each split
    cold_threshold: int
    cold_users: dict[str, float]  # valid / test: share of interactions whose user has < cold_threshold in train
    cold_items: dict[str, float]  # the same for items
    example_item: str  # how prompts describe the first item of the test split
    example_user: str
    warnings: tuple[str, ...] = field(default=())


def check_log(path: str | os.PathLike | None = None, cold_threshold: int = 5, **params: object) -> DataSummary:
    """Load a log with :class:`InteractionsDataset` (`params` as in ``dataset_params``) and summarize it.

    Raises ``ValueError`` (``DataError``) with the loader's one-line message when the log is unusable.
    """
    return summarize_dataset(InteractionsDataset(path, **params), cold_threshold, source=str(path or "the query"))


def summarize_dataset(dataset: Dataset, cold_threshold: int = 5, source: str = "") -> DataSummary:
    """Summarize any dataset (loading it if needed); data warnings are collected, not printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        tables = dataset.load()
    inter = tables.interactions
    time = inter["time"] if "time" in inter else inter["ts"]
    slices = RequestSlices.from_train(tables.split("train"), cold_threshold)
    cold_users, cold_items = {}, {}
    for split in ("valid", "test"):
        rows = tables.split(split)
        masks = slices.masks_of(rows["user"].to_numpy(), rows["item"].to_numpy())
        cold_users[split] = float(masks["cold_users"].mean())
        cold_items[split] = float(masks["cold_items"].mean())
    template = dataset.prompt_template if isinstance(dataset, TemplatedDataset) else PromptTemplate()
    builder = PromptBuilder(tables.users, tables.items, max_tokens=10_000, template=template)
    first = tables.split("test").iloc[0]
    return DataSummary(
        source=source or type(dataset).__name__,
        users=int(inter["user"].nunique()),
        items=int(inter["item"].nunique()),
        interactions=len(inter),
        first_time=_when(time.iloc[0]),
        last_time=_when(time.iloc[-1]),
        like_rate=float(inter["label"].mean()),
        splits={split: len(tables.split(split)) for split in SPLITS},
        split_starts={split: _when(time[inter["split"] == split].iloc[0]) for split in SPLITS},
        cold_threshold=cold_threshold,
        cold_users=cold_users,
        cold_items=cold_items,
        example_item=builder.item_text(int(first["item"])),
        example_user=builder.user_text(int(first["user"])) if template.user else "(no user columns)",
        warnings=tuple(str(w.message) for w in caught if issubclass(w.category, DataWarning)),
    )


def _when(value: object) -> str:
    if isinstance(value, pd.Timestamp):
        return value.isoformat(sep=" ")
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else str(value)


def format_summary(summary: DataSummary) -> str:
    """The summary as a few lines of text (what `mhee data check` prints)."""
    s = summary
    splits = ", ".join(f"{name} {s.splits[name]:,} (from {s.split_starts[name]})" for name in SPLITS)
    cold = "; ".join(
        f"{split}: users {s.cold_users[split]:.1%}, items {s.cold_items[split]:.1%}" for split in ("valid", "test")
    )
    return "\n".join([
        f"{s.source}: {s.interactions:,} interactions, {s.users:,} users, {s.items:,} items",
        f"time: {s.first_time} .. {s.last_time}",
        f"liked (label 1): {s.like_rate:.1%}",
        f"split by time: {splits}",
        f"cold (fewer than {s.cold_threshold} training interactions), share of requests: {cold}",
        f"prompts describe a test item as: {s.example_item}",
        f"... and its user as: {s.example_user}",
    ])  # fmt: skip
