"""What an mhee store file holds: its tables, the schema version and migration, and the checks made on open.

A file is checked before anything is read from it: a folder, a missing or empty file, a DuckDB database
that is not a store (or defines views and macros), a damaged one, or one with a newer schema each give a
:class:`StoreError` that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from mhee_sdk.store.connection import _FIX_DAMAGED, StoreError

SCHEMA_VERSION = 2  # 2: runs.pid, runs.host, runs.heartbeat
DEFAULT_PATH = "mhee_runs.duckdb"

SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, status VARCHAR, created TIMESTAMP,
    finished TIMESTAMP, config VARCHAR, versions VARCHAR, exit_layers VARCHAR, num_layers INTEGER,
    requests_key VARCHAR, parent_run VARCHAR, error VARCHAR, pid INTEGER, host VARCHAR, heartbeat TIMESTAMP);
CREATE TABLE predictions (
    run_id VARCHAR, request_id BIGINT, "user" BIGINT, item BIGINT, label INTEGER, prob DOUBLE,
    exit_layer INTEGER, latency_s DOUBLE);
CREATE TABLE layer_outputs (run_id VARCHAR, request_id BIGINT, layer INTEGER, head VARCHAR, prob DOUBLE);
CREATE TABLE requests (run_id VARCHAR, request_id BIGINT, prompt VARCHAR, retrieved VARCHAR);
CREATE TABLE metrics (run_id VARCHAR, name VARCHAR, value DOUBLE);
CREATE TABLE timings (run_id VARCHAR, stage VARCHAR, seconds DOUBLE, requests INTEGER);
"""

_RUN_PROCESS = ["pid", "host", "heartbeat"]  # added by schema 2
_TABLES = {
    "schema_version": ["version"],
    "runs": [
        "run_id",
        "name",
        "kind",
        "status",
        "created",
        "finished",
        "config",
        "versions",
        "exit_layers",
        "num_layers",
        "requests_key",
        "parent_run",
        "error",
    ],
    "predictions": ["run_id", "request_id", "user", "item", "label", "prob", "exit_layer", "latency_s"],
    "layer_outputs": ["run_id", "request_id", "layer", "head", "prob"],
    "requests": ["run_id", "request_id", "prompt", "retrieved"],
    "metrics": ["run_id", "name", "value"],
    "timings": ["run_id", "stage", "seconds", "requests"],
}
_COLUMNS = {table: _TABLES[table][1:] for table in ("predictions", "layer_outputs", "requests")}
_MIGRATE_1_TO_2 = """
ALTER TABLE runs ADD COLUMN pid INTEGER;
ALTER TABLE runs ADD COLUMN host VARCHAR;
ALTER TABLE runs ADD COLUMN heartbeat TIMESTAMP;
UPDATE schema_version SET version = 2;
"""


def check_location(path: Path, read_only: bool) -> None:
    """Refuse a path that cannot hold a store, before DuckDB sees it."""
    folder = path.absolute().parent
    if not folder.is_dir():
        raise StoreError(
            f"folder {folder} does not exist; create it (mkdir -p {folder}) or choose another store path than {path}"
        )
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give a file path for the store, e.g. {path / DEFAULT_PATH}")
    if read_only and not path.is_file():
        raise StoreError(f"{path} does not exist; run an evaluation first (e.g. `mhee demo`)")
    if read_only and path.stat().st_size == 0:
        raise StoreError(f"{path} is an empty file, not an mhee store yet; record a run into it first")


def inspect(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> int | None:
    """The file's schema version after checking it is an intact mhee store; None for an empty database."""
    objects = con.execute(
        """SELECT table_name, table_type FROM information_schema.tables WHERE table_catalog = current_database()
           UNION ALL SELECT function_name, 'MACRO' FROM duckdb_functions()
           WHERE NOT internal AND database_name = current_database()"""
    ).fetchall()
    kinds = dict(objects)
    if not objects:
        if read_only:
            raise StoreError(f"{path} is an empty DuckDB file, not an mhee store yet; record a run into it first")
        return None
    if "schema_version" not in kinds:
        names = ", ".join(sorted(kinds)[:8])
        raise StoreError(
            f"{path} is a DuckDB database but not an mhee store (it holds {names}); use a new file for the store"
        )
    foreign = sorted(f"{kind.lower()} {name}" for name, kind in objects if kind != "BASE TABLE")
    if foreign:
        # a view or macro could read other files or disguise what the store's queries return
        raise StoreError(f"{path} is not a plain mhee store: it defines {', '.join(foreign)}; {_FIX_DAMAGED}")
    found = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
    if found is None:
        raise StoreError(f"{path} has an empty schema_version table, so its format is unknown; {_FIX_DAMAGED}")
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema {found}, newer than this mhee-sdk understands "
            f"({SCHEMA_VERSION}); upgrade mhee-sdk"
        )
    columns = con.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_catalog = current_database()"
    ).fetchall()
    have: dict[str, set[str]] = {}
    for table, column in columns:
        have.setdefault(table, set()).add(column)
    for table, expected in _TABLES.items():
        expected = expected + _RUN_PROCESS if table == "runs" and found >= 2 else expected
        if table not in have:
            raise StoreError(f"{path} lacks the table {table!r} of an mhee store; {_FIX_DAMAGED}")
        missing = [c for c in expected if c not in have[table]]
        if missing:
            raise StoreError(f"{path}: table {table!r} lacks columns {missing}; {_FIX_DAMAGED}")
    return int(found)


def create_or_migrate(con: duckdb.DuckDBPyConnection, found: int | None) -> None:
    """Inside the caller's transaction: create the tables in an empty database, or bring an older schema up to date."""
    if found is None:
        con.execute(SCHEMA)
        con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
    elif found < SCHEMA_VERSION:
        con.execute(_MIGRATE_1_TO_2)
