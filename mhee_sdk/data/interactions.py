"""Any interaction log as a dataset: a CSV / Parquet / JSON-lines file or a DuckDB query, plus a column mapping.

Every parameter is plain data (``dataset_params`` of a run config), so a user's own file needs no Python::

    dataset = "interactions"
    [dataset_params]
    path = "clicks.csv"
    user = "visitor"
    item = "sku"
    timestamp = "time"
    label = "clicked"                  # 0/1; or: rating = "stars" with like_threshold = 4
    item_columns = ["title", "category"]

What it guarantees, as for MovieLens-100K (which is one instance of it):

- Time split: interactions ordered by time (ties by user, then item) are cut into train / valid / test by
  `fractions`; a cut never falls between equal timestamps, so valid and test are strictly later than train.
- Evidence strictly before each request (:class:`~mhee_sdk.data.log.InteractionLog`).
- Ids of any type: non-negative integer ids below twice their count plus 1,000 are kept; others (text, floats,
  sparse or negative integers) become codes 0..n-1 in sorted order. Requests carry the ints; the users and
  items tables keep the original ids in ``user_id`` / ``item_id``.
- Timestamps: numbers or parseable dates. ``ts`` is the time itself when every value is a whole
  non-negative number (dates: whole seconds since 1970, UTC); otherwise its rank (1 = earliest, equal
  times share one), which keeps order and ties exactly. The original value is the ``time`` column.
- Duplicates: rows that repeat a (user, item, timestamp) are dropped but the last in file order (a warning
  says how many).
- All or nothing: every check runs before any table is kept; a bad file raises :class:`DataError` naming the
  row or column and the fix (``mhee data check`` prints the same message).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from mhee_sdk.data.columns import encode_ids, join_list, lookup_ids, parse_timestamps, show_value
from mhee_sdk.data.log import InteractionLog
from mhee_sdk.data.prompt import PromptTemplate
from mhee_sdk.data.source import DataError, DataWarning, read_file, read_query
from mhee_sdk.data.split import check_fractions, temporal_split
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import DatasetTables
from mhee_sdk.types import Request

_RESERVED = {"user", "item", "user_id", "item_id", "id"}


@dataclass(frozen=True)
class _Source:
    """A table as read, with the words errors use for it."""

    frame: pd.DataFrame
    where: str  # "clicks.csv" or "the query"


class InteractionsDataset:
    """Users, items and time-stamped interactions read from a file or query through a column mapping.

    Args:
        path: the log: CSV, TSV, Parquet, JSON lines or JSON (by extension, or `format`).
        query: instead of `path`, one DuckDB ``SELECT`` over files (run read-only in memory).
        format: csv, tsv, parquet, jsonl or json, for every file of the dataset (default: by extension).
        sep: the column separator of CSV files (default ``,``; tab for tsv).
        user, item, timestamp: the log's columns holding the user id, item id and time.
        label: the column of a binary outcome (0/1: click, purchase, like) ...
        rating: ... or of a graded one, liked when ``>= like_threshold``.
        item_columns, user_columns: columns that describe items / users (a list, or a table
            ``{name = "source column"}`` to rename); from `items_path` / `users_path` when given, else the
            log's last non-empty value per item / user.
        items_path, item_key: a side table of items and its id column (default: the log's `item` name).
        users_path, user_key: the same for users.
        list_columns: columns holding lists, with their separator (``{ genres = "|" }``); shown as "a, b".
        fractions: train / valid / test shares of the time-ordered log.
        template: the dataset's prompt template (Python only; run configs override fields with ``prompt``).
    """

    name = "interactions"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        query: str | None = None,
        format: str | None = None,  # the run-config key users write, though it shadows the builtin
        sep: str | None = None,
        user: str = "user",
        item: str = "item",
        timestamp: str = "timestamp",
        label: str | None = None,
        rating: str | None = None,
        like_threshold: float | None = None,
        item_columns: Sequence[str] | Mapping[str, str] = (),
        user_columns: Sequence[str] | Mapping[str, str] = (),
        items_path: str | os.PathLike | None = None,
        item_key: str | None = None,
        users_path: str | os.PathLike | None = None,
        user_key: str | None = None,
        list_columns: Mapping[str, str] | None = None,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        template: PromptTemplate | None = None,
    ) -> None:
        if (path is None) == (query is None):
            raise ValueError("dataset_params need exactly one of path (a file) or query (a DuckDB SELECT)")
        if (label is None) == (rating is None):
            raise ValueError(
                "dataset_params need exactly one outcome column: label = '<0/1 column>' or rating = '<column>' "
                "with like_threshold"
            )
        if rating is not None and not isinstance(like_threshold, int | float):
            raise ValueError(f"rating = {rating!r} needs like_threshold (a number: ratings >= it are liked)")
        if label is not None and like_threshold is not None:
            raise ValueError("like_threshold applies to rating, not to a 0/1 label; remove it")
        if template is not None and not isinstance(template, PromptTemplate):
            raise ValueError("template must be a PromptTemplate; in a run config, set the `prompt` table instead")
        self.path, self.query, self.format, self.sep = path, query, format, sep
        self.user, self.item, self.timestamp, self.label, self.rating = user, item, timestamp, label, rating
        self.like_threshold = None if like_threshold is None else float(like_threshold)
        self.item_columns = _column_map("item_columns", item_columns, "item")
        self.user_columns = _column_map("user_columns", user_columns, "user")
        self.items_path, self.item_key = items_path, item_key or item
        self.users_path, self.user_key = users_path, user_key or user
        self.list_columns = dict(list_columns or {})
        unknown = sorted(set(self.list_columns) - set(self.item_columns) - set(self.user_columns))
        if unknown:
            raise ValueError(f"list_columns {unknown} are not among item_columns or user_columns")
        self.fractions = tuple(float(f) for f in check_fractions(fractions))
        self._template = template

    # ------------------------------------------------------------------ the Dataset contract
    def load(self) -> DatasetTables:
        """Read and check everything (cached on the instance; nothing is kept when a check fails)."""
        return self._tables

    @cached_property
    def log(self) -> InteractionLog:
        """All interactions, for strictly-earlier look-ups."""
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

    @property
    def prompt_template(self) -> PromptTemplate:
        """The template given, else one from the mapping: item text from `item_columns`, clicks or ratings wording."""
        if self._template is not None:
            return self._template
        names = list(self.item_columns)
        item = [f"{{{names[0]}}} ({'; '.join(f'{{{n}}}' for n in names[1:])})", f"{{{names[0]}}}"] if names else []
        item = item[1:] if len(names) == 1 else item
        user = ["a user with " + ", ".join(f"{n} {{{n}}}" for n in self.user_columns)] if self.user_columns else []
        if self.label is None:
            return PromptTemplate(item=tuple(item), user=tuple(user))
        return PromptTemplate(
            item=tuple(item), user=tuple(user), rating_words={"1": "liked", "0": "not liked"},
            history_heading="The user's earlier interactions:", candidate_heading="Similar users and the candidate:",
            similar_heading="Similar users' interactions:", similar_line="- {user}, {item}: {rating}",
        )  # fmt: skip

    # ------------------------------------------------------------------ reading and checking
    @cached_property
    def _tables(self) -> DatasetTables:
        log = self._read_log()
        frame = log.frame
        outcome = "label" if self.label is not None else "rating"
        mapping = {self.user: "user", self.item: "item", self.timestamp: "timestamp", getattr(self, outcome): outcome}
        self._require(log, mapping, "the log")
        n = len(frame)
        users, user_ids = encode_ids(frame[self.user], "user", log.where)
        items, item_ids = encode_ids(frame[self.item], "item", log.where)
        ts, time = parse_timestamps(frame[self.timestamp], log.where)
        rating, label = self._outcome(frame, log.where)
        inter = pd.DataFrame({"user": users, "item": items, "rating": rating, "ts": ts, "label": label,
                              "time": time, "row": np.arange(1, n + 1)})  # fmt: skip
        repeated = inter.duplicated(["user", "item", "ts"], keep="last")
        if repeated.any():
            first = int(inter.loc[repeated, "row"].iloc[0])
            warnings.warn(
                f"{int(repeated.sum())} rows of {log.where} repeat the (user, item, timestamp) of a later row "
                f"(the first is row {first}); only the last of each is kept",
                DataWarning,
                stacklevel=3,
            )
            inter = inter[~repeated]
        inter = inter.sort_values(["ts", "user", "item"], kind="stable").reset_index(drop=True)
        try:
            inter["split"] = temporal_split(inter["ts"].to_numpy(), self.fractions)
        except ValueError as err:
            raise DataError(f"{log.where}: {err}") from err
        train = inter.loc[inter["split"] == "train", "label"]
        if train.nunique() < 2:
            raise DataError(
                f"{log.where}: every training interaction has label {int(train.iloc[0])}; the heads need both "
                "liked and not-liked examples (check label / like_threshold)"
            )
        users_table = self._side("user", users, user_ids, self.user_columns, self.users_path, self.user_key, log)
        items_table = self._side("item", items, item_ids, self.item_columns, self.items_path, self.item_key, log)
        inter = inter.drop(columns="row")
        return DatasetTables(interactions=inter, users=users_table, items=items_table)

    def _read_log(self) -> _Source:
        if self.query is not None:
            return self._nonempty(_Source(read_query(self.query), "the query"))
        text = [self.user, self.item]
        frame = read_file(self.path, self.format, self.sep, text_columns=text)
        return self._nonempty(_Source(frame, Path(self.path).name))

    @staticmethod
    def _nonempty(source: _Source) -> _Source:
        if source.frame.empty:
            raise DataError(f"{source.where} has no rows; it needs one row per interaction")
        return source

    def _require(self, source: _Source, columns: Mapping[str, str], what: str) -> None:
        """Every mapped column (``{column: the setting naming it}``) exists; else name it, a close match, the rest."""
        present = [str(c) for c in source.frame.columns]
        for column, key in columns.items():
            if column in present:
                continue
            close = difflib.get_close_matches(column, present, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            flag = key.replace("_", "-")
            setting = f" (dataset_params.{key}; --{flag} in mhee data check)"
            raise DataError(f"{source.where} has no column {column!r}{setting}; {hint}{what} has: {', '.join(present)}")

    def _outcome(self, frame: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(rating, label) per row: a 0/1 label is its own rating; a rating is liked at >= like_threshold."""
        column = self.label or self.rating
        values = frame[column]
        numbers = values.astype(np.int64) if values.dtype == bool else pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() | ~np.isfinite(numbers.astype(np.float64).fillna(0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raw = values.iloc[row]
            what = "is empty" if pd.isna(raw) else f"is {show_value(raw)}, not a number"
            raise DataError(
                f"{where} row {row + 1}: the {self._kind()} in column {column!r} {what}; fix the value or drop the row"
            )
        numbers = numbers.to_numpy(np.float64)
        if self.label is not None:
            outside = ~np.isin(numbers, (0.0, 1.0))
            if outside.any():
                row = int(np.flatnonzero(outside)[0])
                value = show_value(values.iloc[row])
                raise DataError(
                    f"{where} row {row + 1}: the label in column {column!r} is {value}, not 0 or 1; "
                    "map it to 0/1, or use rating with like_threshold for graded feedback"
                )
            return numbers, numbers.astype(np.int64)
        return numbers, (numbers >= self.like_threshold).astype(np.int64)

    def _kind(self) -> str:
        return "label" if self.label is not None else "rating"

    def _side(
        self,
        what: str,
        codes: np.ndarray,
        ids: np.ndarray,
        columns: Mapping[str, str],
        path: str | os.PathLike | None,
        key: str,
        log: _Source,
    ) -> pd.DataFrame:
        """The users or items table: one row per code, the original id, and the describing columns."""
        table = pd.DataFrame({what: np.arange(len(ids), dtype=np.int64), f"{what}_id": ids})
        table = table[pd.notna(table[f"{what}_id"])].reset_index(drop=True)  # codes kept as ids can have gaps
        table[f"{what}_id"] = table[f"{what}_id"].infer_objects()  # int ids as int64, not objects
        if not columns:
            return table
        if path is None:
            source = log
            self._require(source, dict.fromkeys(columns.values(), f"{what}_columns"), "the log")
            values = source.frame[list(columns.values())].set_axis(list(columns), axis=1)
            values = values.groupby(codes, sort=True).last()  # the last non-empty value in file order
        else:
            frame = read_file(path, self.format, self.sep, text_columns=[key])
            source = self._nonempty(_Source(frame, Path(path).name))
            self._require(source, {key: f"{what}_key", **dict.fromkeys(columns.values(), f"{what}_columns")},
                          f"{what}s_path")  # fmt: skip
            side_codes = lookup_ids(frame[key], ids)
            repeated = pd.Series(frame[key]).duplicated().to_numpy()
            if repeated.any():
                row = int(np.flatnonzero(repeated)[0])
                twice = show_value(frame[key].iloc[row])
                raise DataError(f"{source.where} row {row + 1}: {what} id {twice} appears twice; keep one per {what}")
            known = side_codes >= 0
            if not known.any():
                raise DataError(
                    f"no {what} id of {source.where} (column {key!r}) occurs in the log's column "
                    f"{getattr(self, what)!r}; check {what}_key"
                )
            missing = len(np.unique(codes)) - int(known.sum())
            if missing > 0:
                warnings.warn(
                    f"{missing} of {len(np.unique(codes))} {what}s in the log have no row in {source.where}; "
                    f"prompts describe them by id",
                    DataWarning,
                    stacklevel=4,
                )
            values = frame.loc[known, list(columns.values())].set_axis(list(columns), axis=1)
            values.index = side_codes[known]
        for name, separator in self.list_columns.items():
            if name in values:
                values[name] = values[name].map(lambda v, s=separator: join_list(v, s))
        return table.join(values, on=what)


def _column_map(name: str, columns: Sequence[str] | Mapping[str, str], what: str) -> dict[str, str]:
    """``{name in tables and templates: source column}`` from a list (same names) or a mapping."""
    if isinstance(columns, str):
        columns = [columns]
    mapping = dict(columns) if isinstance(columns, Mapping) else {str(c): str(c) for c in columns}
    clash = sorted(set(mapping) & _RESERVED)
    if clash:
        raise ValueError(
            f"{name} may not be called {clash[0]!r} (reserved for ids); rename it: {name} = {{ {what}_{clash[0]} = "
            f"{mapping[clash[0]]!r} }}"
        )
    return mapping


@hookimpl
def register_datasets(register) -> None:
    register("interactions", InteractionsDataset, "any interaction log: CSV/Parquet/JSON lines/DuckDB query")


__all__ = ["DataError", "DataWarning", "InteractionsDataset"]
