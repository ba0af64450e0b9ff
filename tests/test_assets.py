from __future__ import annotations

import shutil

import pytest

from mhee_sdk import assets


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MHEE_HOME", str(tmp_path))
    return tmp_path


def test_missing_model_error_names_the_command(home):
    with pytest.raises(assets.AssetMissingError, match=r"run `mhee assets install`"):
        assets.model_dir()
    assert {row["name"]: row["state"] for row in assets.status()} == {
        "smollm2-135m": "missing",
        "movielens-100k": "missing",
    }


def test_install_is_verified_idempotent_and_repairs(home, monkeypatch):
    # Seed the wheel from the real cache so the test does not depend on the package index.
    monkeypatch.delenv("MHEE_HOME")
    real = assets.home() / "wheels"
    monkeypatch.setenv("MHEE_HOME", str(home))
    (home / "wheels").mkdir()
    for wheel in real.glob("recbole-1.2.1-*.whl"):
        shutil.copy(wheel, home / "wheels")
    messages: list[str] = []
    assets.install([assets.MOVIELENS], log=messages.append)
    assert any("extracting ml-100k.inter" in m for m in messages)
    inter = assets.asset_file(assets.MOVIELENS, "ml-100k.inter")
    assert assets.sha256(inter) == assets.ASSETS[assets.MOVIELENS].files[0].sha256

    messages.clear()
    assets.install([assets.MOVIELENS], log=messages.append)
    assert not any("extracting" in m or "downloading" in m for m in messages)  # second run reuses

    inter.write_bytes(inter.read_bytes()[:-10] + b"0123456789")  # same size, wrong content
    assert next(r for r in assets.status() if r["name"] == "movielens-100k")["state"] == "missing"
    messages.clear()
    assets.install([assets.MOVIELENS], log=messages.append)
    assert messages[0] == "extracting ml-100k.inter (2.0 MB)"
    assert assets.sha256(inter) == assets.ASSETS[assets.MOVIELENS].files[0].sha256


def test_unknown_asset_lists_choices(home):
    with pytest.raises(ValueError, match="asset 'ml-1m' is unknown; choose from: smollm2-135m, movielens-100k"):
        assets.install(["ml-1m"])
