"""Shared fixtures: the real MovieLens files, a tiny random backbone, the real plugin registry."""

from __future__ import annotations

import textwrap
import uuid

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


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install_plugin(source, ep_name=None) -> entry-point name``: a one-module plugin distribution.

    As `pip install` would: a module plus a ``*.dist-info`` folder whose ``entry_points.txt`` names it,
    in tmp_path, which goes on sys.path for the test.
    """

    def install(source: str, ep_name: str | None = None) -> str:
        module = f"plugin_{uuid.uuid4().hex[:8]}"
        ep_name = ep_name or module
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        dist = tmp_path / f"{module}-0.3.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.3.1\n")
        (dist / "entry_points.txt").write_text(f"[mhee_sdk]\n{ep_name} = {module}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        return ep_name

    return install
