"""From raw log columns to what the core needs: integer ids, integer times, numbers, display text.

Each function raises :class:`~mhee_sdk.data.source.DataError` naming the first bad row (1-based, in the
order of the source; a CSV's header is not counted) and how to fix it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from mhee_sdk.data.source import DataError


def show_value(value: Any) -> str:
    """A cell as messages quote it: text in quotes, numbers plain (``'four'``, ``2``)."""
    return repr(value) if isinstance(value, str) else str(value)


def join_list(value: Any, separator: str) -> Any:
    if not isinstance(value, str):
        return value
    return ", ".join(part.strip() for part in value.split(separator) if part.strip())


def _canonical(values: pd.Series) -> pd.Series:
    """Text ids that are all plain non-negative integers ("7", not "007") as ints; others unchanged."""
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        text = values.astype(str)
        if text.str.fullmatch(r"0|[1-9][0-9]{0,17}").all():
            return text.astype(np.int64)
    return values


def encode_ids(values: pd.Series, what: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(int code per row, original id per code; NaN for unused codes)."""
    empty = values.isna().to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"{where} row {row + 1}: the {what} id is empty; every interaction needs one")
    values = _canonical(values)
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        ints = values.to_numpy(np.int64)
        distinct = len(np.unique(ints))
        if ints.min() >= 0 and ints.max() < 2 * distinct + 1000:  # compact enough to index arrays by id
            ids = np.full(int(ints.max()) + 1, np.nan, dtype=object)
            ids[ints] = ints
            return ints, ids
    if values.dtype == object and len({type(v) for v in values}) > 1:  # mixed types do not sort: compare as text
        values = values.astype(str)
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def lookup_ids(keys: pd.Series, ids: np.ndarray) -> np.ndarray:
    """Code of each side-table key (-1 when the log has no such id); text and integer ids compare as the log's."""
    keys = _canonical(keys.dropna()).reindex(keys.index)
    known = pd.notna(ids)
    index = pd.Index(list(ids[known]))
    codes = np.flatnonzero(known)
    found = index.get_indexer(list(keys))
    if (found < 0).all() and len(index):  # e.g. integer ids in the log, text in the side table
        found = pd.Index([str(v) for v in index]).get_indexer([str(k) for k in keys])
    return np.where(found >= 0, codes[np.maximum(found, 0)], -1)


def parse_timestamps(values: pd.Series, where: str) -> tuple[np.ndarray, pd.Series]:
    """(int ts per row, the parsed time): whole non-negative times as they are, else their dense rank."""
    empty = values.isna().to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"{where} row {row + 1}: the timestamp is empty; every interaction needs a time")
    if pd.api.types.is_bool_dtype(values):
        raise DataError(f"{where}: the timestamp column holds true/false values; map a time column")
    numbers = values if pd.api.types.is_numeric_dtype(values) else pd.to_numeric(values, errors="coerce")
    if not pd.api.types.is_datetime64_any_dtype(values) and numbers.notna().all():
        order = numbers.to_numpy(np.float64)
        if not np.isfinite(order).all():
            row = int(np.flatnonzero(~np.isfinite(order))[0])
            raise DataError(f"{where} row {row + 1}: the timestamp {show_value(values.iloc[row])} is not finite")
        whole = (order >= 0).all() and (order == np.floor(order)).all() and order.max() < 2**53
        return (order.astype(np.int64) if whole else _rank(order)), numbers.reset_index(drop=True)
    times = values if pd.api.types.is_datetime64_any_dtype(values) else _parse_dates(values, where)
    times = times.dt.tz_localize("UTC") if times.dt.tz is None else times.dt.tz_convert("UTC")
    since = (times - pd.Timestamp(0, tz="UTC")).reset_index(drop=True)
    seconds = since // pd.Timedelta(seconds=1)
    whole = bool((since % pd.Timedelta(seconds=1) == pd.Timedelta(0)).all()) and (seconds >= 0).all()
    ts = seconds.to_numpy(np.int64) if whole else _rank(since.to_numpy().astype("timedelta64[ns]").astype(np.int64))
    return ts, times.reset_index(drop=True)


def _parse_dates(values: pd.Series, where: str) -> pd.Series:
    with warnings.catch_warnings():  # "could not infer format": the mixed-format retry below handles it
        warnings.simplefilter("ignore", UserWarning)
        times = pd.to_datetime(values, errors="coerce", utc=True)
        if times.isna().any():
            times = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    bad = times.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where} row {row + 1}: the timestamp {show_value(values.iloc[row])} is neither a number nor a date; "
            "fix it (e.g. 2024-05-01 13:45:00) or drop the row"
        )
    return times


def _rank(order: np.ndarray) -> np.ndarray:
    """Dense rank from 1: order and ties kept, values small."""
    return np.unique(order, return_inverse=True)[1].astype(np.int64).ravel() + 1
