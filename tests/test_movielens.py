from __future__ import annotations

import numpy as np
import pytest

from mhee_sdk.data.movielens import MovieLens100K, temporal_split


def test_loader_counts(movielens):
    tables = movielens.load()
    assert len(tables.users) == 943
    assert len(tables.items) == 1682
    assert len(tables.interactions) == 100_000
    assert tables.interactions["user"].nunique() == 943
    assert tables.interactions["item"].nunique() == 1682
    assert set(tables.users.columns) >= {"user", "age", "gender", "occupation"}
    assert set(tables.items.columns) >= {"item", "title", "year", "genres"}


def test_labels_follow_rating_threshold(movielens):
    inter = movielens.load().interactions
    assert ((inter["rating"] >= 4) == (inter["label"] == 1)).all()
    assert 0.5 < inter["label"].mean() < 0.6  # MovieLens-100K: 55.4% of ratings are 4 or 5


def test_split_is_temporal_and_strict(movielens):
    tables = movielens.load()
    train, valid, test = (tables.split(s) for s in ("train", "valid", "test"))
    assert len(train) + len(valid) + len(test) == 100_000
    assert 0.79 < len(train) / 100_000 < 0.81
    assert train["ts"].max() < valid["ts"].min()
    assert valid["ts"].max() < test["ts"].min()


def test_no_request_history_at_or_after_its_timestamp(movielens):
    log = movielens.log
    requests = movielens.requests("test")
    assert len(requests) == len(movielens.load().split("test"))
    with_history = 0
    for request in requests:
        history = log.before(request.user, request.ts)
        assert np.all(history.ts < request.ts)
        assert np.all(history.user == request.user)
        with_history += history.size > 0
    assert with_history > 0.9 * len(requests)


def test_history_is_everything_strictly_earlier(movielens):
    inter = movielens.load().interactions
    request = movielens.requests("test", limit=1, seed=3)[0]
    expected = inter[(inter["user"] == request.user) & (inter["ts"] < request.ts)]
    history = movielens.log.before(request.user, request.ts)
    assert history.size == len(expected)
    assert sorted(history.item.tolist()) == sorted(expected["item"].tolist())


def test_request_sampling_is_seeded_and_time_ordered(movielens):
    a = movielens.requests("valid", limit=50, seed=1)
    b = movielens.requests("valid", limit=50, seed=1)
    c = movielens.requests("valid", limit=50, seed=2)
    assert a == b and a != c
    assert [r.ts for r in a] == sorted(r.ts for r in a)
    inter = movielens.load().interactions
    for r in a[:5]:
        row = inter.loc[r.request_id]
        assert (row["user"], row["item"], row["label"], row["split"]) == (r.user, r.item, r.label, "valid")


def test_bad_split_and_limit(movielens):
    with pytest.raises(ValueError, match="split 'tset' is unknown; choose from: train, valid, test"):
        movielens.requests("tset")
    with pytest.raises(ValueError, match="limit"):
        movielens.requests("test", limit=0)


def test_temporal_split_never_cuts_a_tie():
    ts = np.array([1, 2, 3, 3, 3, 3, 4, 5, 6, 7])
    labels = temporal_split(ts, (0.3, 0.3, 0.4))
    assert labels.tolist() == ["train"] * 6 + ["valid"] + ["test"] * 3
    with pytest.raises(ValueError, match="fractions"):
        temporal_split(ts, (0.5, 0.5, 0.5))


def test_missing_asset_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MHEE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mhee assets install"):
        MovieLens100K().load()
