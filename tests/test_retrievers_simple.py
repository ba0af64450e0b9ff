"""The baseline retrievers `none`, `recent` and `random` on real MovieLens requests."""

from __future__ import annotations

import pytest

from mhee_sdk.retrievers.simple import NoRetriever, RandomRetriever, RecentRetriever
from mhee_sdk.testing import check_retriever


@pytest.mark.parametrize("retriever", [NoRetriever(), RecentRetriever(), RandomRetriever(seed=3)], ids=str)
def test_keeps_the_contract_and_the_time_rule(retriever, movielens):
    check_retriever(retriever, movielens, k=5)  # includes: nothing at or after the request's timestamp


@pytest.fixture(scope="module")
def requests(movielens):
    return movielens.requests("test", limit=50, seed=0) + movielens.requests("valid", limit=50, seed=0)


def test_recent_is_the_newest_earlier_ratings_newest_first(movielens, requests):
    retriever = RecentRetriever().fit(movielens.load().split("train"), movielens.log)
    for request, found in zip(requests, retriever.retrieve(requests, 4), strict=True):
        earlier = movielens.log.before(request.user, request.ts)
        assert [r.ts for r in found] == sorted(earlier.ts[-4:].tolist(), reverse=True)
        assert all(r.ts < request.ts for r in found)


def test_random_is_seeded(movielens, requests):
    train = movielens.load().split("train")
    first = RandomRetriever(seed=1).fit(train, movielens.log).retrieve(requests, 5)
    again = RandomRetriever(seed=1).fit(train, movielens.log).retrieve(requests, 5)
    other = RandomRetriever(seed=2).fit(train, movielens.log).retrieve(requests, 5)
    assert first == again
    assert first != other
    assert first[:10] == RandomRetriever(seed=1).fit(train, movielens.log).retrieve(requests[:10], 5)  # per request


def test_unfitted_and_bad_k_say_so(requests):
    with pytest.raises(RuntimeError, match="not fitted"):
        RecentRetriever().retrieve(requests[:1], 3)
    with pytest.raises(ValueError, match="k=-2"):
        NoRetriever().retrieve(requests[:1], -2)
