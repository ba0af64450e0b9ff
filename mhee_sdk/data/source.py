"""Reads one table of a dataset: a CSV / TSV / Parquet / JSON-lines file, or a DuckDB SQL query over files.

Errors are :class:`DataError` (a ``ValueError``) with one line that names the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

FORMATS = ("csv", "tsv", "parquet", "jsonl", "json")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
             ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}  # fmt: skip
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}  # pandas reads these by extension


class DataError(ValueError):
    """Input data that cannot be loaded; the message names the row or column and how to fix it."""


class DataWarning(UserWarning):
    """Input data that loads, but not exactly as written (e.g. duplicate rows dropped); the message says how."""


def file_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """`fmt` when given, else the format the file's extension names (``data.csv.gz`` is csv)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"format {fmt!r} is unknown; choose from: {', '.join(FORMATS)}")
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise DataError(f"cannot tell the format of {path} from its extension; set format to one of: {', '.join(FORMATS)}")


def read_file(
    path: str | os.PathLike, fmt: str | None = None, sep: str | None = None, text_columns: Sequence[str] = ()
) -> pd.DataFrame:
    """Read a whole file. CSV/TSV columns in `text_columns` (ids) are read as text, so ``007`` stays ``007``."""
    path = Path(path).expanduser()
    fmt = file_format(path, fmt)
    if not path.is_file():
        raise DataError(f"{path} does not exist (path, relative to {Path.cwd()}); check the name")
    try:
        if fmt in ("csv", "tsv"):
            sep = sep if sep is not None else ("," if fmt == "csv" else "\t")
            header = pd.read_csv(path, sep=sep, nrows=0).columns
            dtype = {column: str for column in text_columns if column in header}
            return pd.read_csv(path, sep=sep, dtype=dtype, low_memory=False)
        if fmt == "parquet":
            return pd.read_parquet(path)
        # values as written: no "007" -> 7 for ids, no guessing which numbers are dates
        frame = pd.read_json(path, lines=fmt == "jsonl", orient="records", dtype=False)
        if frame.columns.size == 0 and frame.empty:
            raise pd.errors.EmptyDataError("no records")
        return frame
    except pd.errors.EmptyDataError as err:
        header = "a header row and " if fmt in ("csv", "tsv") else ""
        raise DataError(f"{path} is empty; it needs {header}one row per interaction") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} is not readable as {fmt} ({first}); check format (and sep for CSV)") from err


def read_query(query: str) -> pd.DataFrame:
    """Run one SQL ``SELECT`` (it may read files: ``FROM 'ratings.parquet'``) in a fresh in-memory DuckDB.

    Only a single SELECT is accepted, and DuckDB may not install or load extensions from the network.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise DataError(f"the query does not parse: {_first_line(err)}") from err
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise DataError(f"the query must be one SELECT statement (read-only), got: {kinds}")
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    con = duckdb.connect(":memory:", config=config)
    try:
        return con.execute(query).df()
    except duckdb.Error as err:
        raise DataError(f"the query failed: {_first_line(err)}") from err
    finally:
        con.close()


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__
