"""Store look-ups the widgets share: the full-depth runs a tuner can replay."""

from __future__ import annotations

from mhee_sdk.store import Store


def full_depth_runs(store: Store, requests_key: str | None = None) -> list[str]:
    """Ids of finished runs with policy ``never`` (newest first); those on `requests_key` first."""
    frame = store.query(
        """SELECT run_id, requests_key FROM runs
           WHERE status = 'finished' AND json_extract_string(config, '$.policy') = 'never'
           ORDER BY created DESC"""
    )
    same = frame["requests_key"] == requests_key
    return list(frame.loc[same, "run_id"]) + list(frame.loc[~same, "run_id"])
