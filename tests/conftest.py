"""Shared fixtures: the real MovieLens files, a tiny random backbone, the real plugin registry."""

from __future__ import annotations

import pytest

from mhee_sdk import MovieLens100K
from mhee_sdk.registry import Registry


@pytest.fixture(scope="session")
def movielens() -> MovieLens100K:
    dataset = MovieLens100K()
    dataset.load()
    return dataset


@pytest.fixture(scope="session")
def tiny():
    from mhee_sdk.backbones.tiny import tiny_backbone

    return tiny_backbone()


@pytest.fixture
def registry() -> Registry:
    return Registry(load_entry_points=False)
