from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mhee_sdk import assets, wheels


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MHEE_HOME", str(tmp_path))
    return tmp_path


def test_missing_model_error_names_the_command(home):
    with pytest.raises(assets.AssetMissingError, match=r"run `mhee assets install`"):
        assets.model_dir()
    assert {row["name"]: (row["state"], row["default"]) for row in assets.status()} == {
        "smollm2-135m": ("missing", "yes"),
        "movielens-100k": ("missing", "yes"),
        "gemma3-270m": ("missing", "no"),  # optional: `mhee assets install gemma3-270m`
    }
    with pytest.raises(assets.AssetMissingError, match=r"run `mhee assets install gemma3-270m`$"):
        assets.model_dir(assets.GEMMA3)


def test_cli_names_the_gemma_install_when_it_is_missing(home, capsys):
    from mhee_sdk import cli

    # the optional model was never installed: one line naming its install command, no traceback
    assert cli.main(["demo", "--backbone", "gemma3-270m", "--samples", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: model 'gemma3-270m' (converted safetensors folder) is not installed in ")
    assert err[-1].endswith("; run `mhee assets install gemma3-270m`") and "Traceback" not in "".join(err)
    # verify, asked for it by name, lists what is missing with the same command; status does not fail on it
    assert cli.main(["assets", "verify", "gemma3-270m"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("gemma3-270m: ") for line in lines)
    assert all(line.endswith(("`mhee assets install gemma3-270m` to install it", "`mhee assets install gemma3-270m`"))
               for line in lines)  # fmt: skip
    assert cli.main(["assets", "verify"]) == 1  # the defaults are missing too, but an absent gemma is not listed
    assert "gemma3-270m" not in capsys.readouterr().out


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
    assert next(r for r in assets.status() if r["name"] == "movielens-100k")["state"] == "damaged"
    messages.clear()
    assets.install([assets.MOVIELENS], log=messages.append)
    assert messages[0] == "extracting ml-100k.inter (2.0 MB)"
    assert assets.sha256(inter) == assets.ASSETS[assets.MOVIELENS].files[0].sha256


def test_unknown_asset_lists_choices(home):
    with pytest.raises(ValueError, match="asset 'ml-1m' is unknown; choose from: smollm2-135m, movielens-100k"):
        assets.install(["ml-1m"])


REAL = Path.home() / ".cache" / "mhee"


@pytest.fixture
def movielens_home(home):
    """A cache with copies of the real MovieLens files (to damage)."""
    folder = home / assets.ASSETS[assets.MOVIELENS].folder
    folder.mkdir(parents=True)
    for item in assets.ASSETS[assets.MOVIELENS].files:
        source = REAL / assets.ASSETS[assets.MOVIELENS].folder / item.filename
        if not source.is_file():
            pytest.skip("needs the real MovieLens files (`mhee assets install movielens-100k`)")
        shutil.copy(source, folder / item.filename)
    return folder


def test_an_altered_or_truncated_data_file_is_refused_at_load(movielens_home):
    from mhee_sdk import MovieLens100K

    inter = movielens_home / "ml-100k.inter"
    original = inter.read_bytes()
    assert assets.asset_file(assets.MOVIELENS, "ml-100k.inter") == inter
    inter.write_bytes(original.replace(b"\t5\t", b"\t1\t", 1))  # one rating changed, same size
    with pytest.raises(
        assets.AssetCorruptError,
        match=r"ml-100k.inter has SHA-256 .*changed or damaged since "
        r"install\); run `mhee assets install movielens-100k` to repair it",
    ):
        MovieLens100K().load()
    inter.write_bytes(original[: len(original) // 2])
    with pytest.raises(assets.AssetCorruptError, match=r"has 989615 bytes, expected 1979230 \(truncated"):
        assets.asset_file(assets.MOVIELENS, "ml-100k.inter")
    assert any("ml-100k.inter has 989615 bytes" in p for p in assets.verify([assets.MOVIELENS]))
    assert next(r for r in assets.status() if r["name"] == "movielens-100k")["state"] == "damaged"


def _fake_model(home: Path, weights: bytes, manifest_files: bool = True) -> Path:
    folder = home / assets.MODEL_FOLDER
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"num_hidden_layers": 2}')
    files = {p.name: {"size": p.stat().st_size, "sha256": assets.sha256(p)} for p in folder.iterdir()}
    manifest = {"model.safetensors": files["model.safetensors"]["sha256"]}
    if manifest_files:
        manifest["files"] = files
    (folder / ".complete.json").write_text(json.dumps(manifest))
    return folder


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _as_if_unchanged_since_verified(path: Path) -> None:
    """Make the stamp vouch for the file as it is now: damage that bypassed the file system (bit rot)."""
    stamp_path = path.with_name(path.name + ".verified.json")
    stamp = json.loads(stamp_path.read_text())
    stat = path.stat()
    stamp["identity"][1:] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    stamp["verified_ns"] = time.time_ns() + 10**10
    stamp_path.write_text(json.dumps(stamp))


def test_changed_weights_are_caught_by_the_cheap_check(home):
    weights = np.random.default_rng(0).bytes(40 << 20)  # large enough for the sampled check
    folder = _fake_model(home, weights)
    path, digest = assets.verified_model_dir()
    assert path == folder and digest == assets.sha256(folder / "model.safetensors")
    stamp = folder / "model.safetensors.verified.json"
    assert stamp.is_file()  # once the file is older than a few seconds, checks are cheap

    _flip(folder / "model.safetensors", 25 << 20)  # any write changes ctime: hashed again
    with pytest.raises(
        assets.AssetCorruptError,
        match=rf"{folder}/model.safetensors has SHA-256 .*run `mhee assets "
        "install smollm2-135m` to repair it",
    ):
        assets.verified_model_dir()
    _flip(folder / "model.safetensors", 25 << 20)  # flipped back: the same bytes again
    assets.verified_model_dir()
    _as_if_unchanged_since_verified(folder / "model.safetensors")
    started = time.perf_counter()
    assets.verified_model_dir()
    assert time.perf_counter() - started < 0.5  # sampled: 8 of 40 MiB

    _flip(folder / "model.safetensors", 100)  # bit rot in the header block, which every check reads
    _as_if_unchanged_since_verified(folder / "model.safetensors")
    with pytest.raises(assets.AssetCorruptError):
        assets.verified_model_dir()
    _flip(folder / "model.safetensors", 100)
    assets.verified_model_dir()

    _flip(folder / "model.safetensors", (20 << 20) + 7)  # bit rot in a middle block
    _as_if_unchanged_since_verified(folder / "model.safetensors")
    assert any("model.safetensors has SHA-256" in p for p in assets.verify([assets.SMOLLM2]))
    caught = 0
    for _ in range(100):  # random blocks cover the file over many loads (6 of 40 per check)
        try:
            assets.verified_model_dir()
        except assets.AssetCorruptError:
            caught += 1
    assert caught > 0

    (folder / "config.json").write_text('{"num_hidden_layers": 3}')  # every file in the folder is pinned
    with pytest.raises(assets.AssetCorruptError, match=r"config\.json has"):
        assets.verified_model_dir()


def test_a_manifest_of_older_installs_still_pins_the_weights(home):
    folder = _fake_model(home, b"weights" * 1000, manifest_files=False)
    assert assets.verified_model_dir()[1] == assets.sha256(folder / "model.safetensors")
    (folder / "model.safetensors").write_bytes(b"weights" * 999)
    with pytest.raises(assets.AssetCorruptError, match=r"model\.safetensors has SHA-256"):
        assets.verified_model_dir()
    (folder / ".complete.json").write_text("{not json")
    with pytest.raises(assets.AssetCorruptError, match=r".complete.json is not a valid manifest"):
        assets.verified_model_dir()


def test_flipped_bytes_in_the_real_weights_are_detected(home):
    source = REAL / assets.MODEL_FOLDER
    if not (source / ".complete.json").is_file():
        pytest.skip("needs the converted SmolLM2 (`mhee assets install smollm2-135m`)")
    shutil.copytree(source, home / assets.MODEL_FOLDER)
    weights = home / assets.MODEL_FOLDER / "model.safetensors"
    digest = assets.verified_model_dir()[1]
    assert digest == json.loads((source / ".complete.json").read_text())["model.safetensors"]
    _flip(weights, weights.stat().st_size // 2)
    with pytest.raises(assets.AssetCorruptError, match=rf"{weights} has SHA-256 .*mhee assets install smollm2-135m"):
        assets.verified_model_dir()
    assert next(r for r in assets.status() if r["name"] == "smollm2-135m")["state"] == "damaged"


def test_install_pins_every_file_of_an_older_verified_install(home):
    gguf = assets.ASSETS[assets.SMOLLM2].files[0]
    source = REAL / assets.ASSETS[assets.SMOLLM2].folder / gguf.filename
    if not source.is_file():
        pytest.skip("needs the SmolLM2 GGUF (`mhee assets install smollm2-135m`)")
    (home / assets.ASSETS[assets.SMOLLM2].folder).mkdir(parents=True)
    (home / assets.ASSETS[assets.SMOLLM2].folder / gguf.filename).symlink_to(source)
    folder = _fake_model(home, b"weights" * 1000, manifest_files=False)
    messages: list[str] = []
    assets.install([assets.SMOLLM2], log=messages.append)
    assert messages == ["ok  smollm2-135m: SmolLM2-135M-Instruct (Q4_1 GGUF), 30 layers, hidden 576"]  # no reconversion
    files = json.loads((folder / ".complete.json").read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors"]
    (folder / "config.json").write_text("{}")
    with pytest.raises(assets.AssetCorruptError, match=r"config\.json has"):
        assets.verified_model_dir()


# ------------------------------------------------------------------ a model shipped in chunk wheels (as gemma3-270m)
CHUNK_SIZES = (300_000, 300_000, 300_000, 123_457)  # the last chunk is shorter, as Gemma's


def _wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)


@pytest.fixture
def chunked(home, monkeypatch):
    """A model asset laid out like gemma3-270m (meta wheel with the terms, the GGUF in 4 chunk wheels), tiny and local.

    The wheels sit in the cache's wheels folder, so install never calls pip. Returns (asset, gguf bytes, conversions).
    """
    data = np.random.default_rng(3).bytes(sum(CHUNK_SIZES))
    wheels = home / "wheels"
    wheels.mkdir()
    terms = b"<html>Fake terms of use</html>"
    _wheel(wheels / "fake_gguf-1.0.0-py3-none-any.whl", {"fake_gguf/data/TERMS.html": terms, "fake_gguf/x.py": b""})
    chunks, start = [], 0
    for i, size in enumerate(CHUNK_SIZES):
        piece, start = data[start : start + size], start + size
        member = f"fake_gguf_part{i + 1}/data/fake.gguf.part{i:02d}"
        _wheel(wheels / f"fake_gguf_part{i + 1}-1.0.0-py3-none-any.whl", {member: piece})
        chunks.append((f"fake-gguf-part{i + 1}", assets.WheelFile(member, size, hashlib.sha256(piece).hexdigest())))
    conversions: list[Path] = []

    def convert(gguf: Path, out: Path, log) -> dict[str, object]:
        conversions.append(gguf)
        (out / "model.safetensors").write_bytes(hashlib.sha256(gguf.read_bytes()).digest() * 100)
        (out / "config.json").write_text('{"num_hidden_layers": 2}')
        return {"num_layers": 2, "hidden_size": 8}

    asset = assets.ModelAsset(
        name="fake-gemma", package="fake-gguf", version="1.0.0", folder="gguf/fake",
        files=(assets.WheelFile("fake_gguf/data/TERMS.html", len(terms), hashlib.sha256(terms).hexdigest()),),
        description="a fake chunked model", default=False, model_folder="models/fake", convert=convert,
        conversion_time="instant",
        gguf=assets.ChunkedFile("fake.gguf", len(data), hashlib.sha256(data).hexdigest(), "1.0.0", tuple(chunks)),
    )  # fmt: skip
    monkeypatch.setitem(assets.ASSETS, "fake-gemma", asset)
    return asset, data, conversions


def test_a_chunked_model_is_assembled_in_order_verified_converted_and_kept(home, chunked):
    _, data, conversions = chunked
    assert not any(p.startswith("fake-gemma") for p in assets.verify())  # neither default nor installed: not checked
    with pytest.raises(assets.AssetMissingError, match=r"run `mhee assets install fake-gemma`$"):
        assets.verified_model_dir("fake-gemma")
    messages: list[str] = []
    assets.install(["fake-gemma"], log=messages.append)
    assert [m.split(" in ")[0] for m in messages] == [
        "extracting TERMS.html (0.0 MB)",
        "assembling fake.gguf (1 MB) from 4 chunks",
        "assembled fake.gguf",
        "converting fake.gguf to safetensors (one time, instant) ...",
        "converted",
        "ok  fake-gemma: a fake chunked model",
    ]
    gguf = home / "gguf/fake/fake.gguf"
    assert gguf.read_bytes() == data  # the chunks in order
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["TERMS.html", "fake.gguf"]  # terms kept, no chunk files
    assert assets.asset_file("fake-gemma", "TERMS.html").read_text() == "<html>Fake terms of use</html>"
    folder, digest = assets.verified_model_dir("fake-gemma")
    manifest = json.loads((folder / ".complete.json").read_text())
    assert manifest["source"] == "fake-gguf==1.0.0:fake.gguf" and manifest["num_layers"] == 2
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors"] and digest == manifest["model.safetensors"]
    assert next(r for r in assets.status() if r["name"] == "fake-gemma") == {
        "name": "fake-gemma", "state": "installed", "location": str(folder),
        "source": "fake-gguf==1.0.0 + 4 chunk wheels", "default": "no",
    }  # fmt: skip
    assert not any(p.startswith("fake-gemma") for p in assets.verify())

    messages.clear()
    assets.install(["fake-gemma"], log=messages.append)
    assert messages == ["ok  fake-gemma: a fake chunked model"] and len(conversions) == 1  # nothing redone

    _flip(gguf, 400_000)  # inside the second chunk: caught at load, reassembled (not reconverted) on install
    with pytest.raises(assets.AssetCorruptError, match=r"fake\.gguf has SHA-256 .*mhee assets install fake-gemma"):
        assets.asset_file("fake-gemma", "fake.gguf")
    assert next(r for r in assets.status() if r["name"] == "fake-gemma")["state"] == "damaged"
    assert any(p.startswith(f"fake-gemma: {gguf} has SHA-256") for p in assets.verify())  # installed: checked
    messages.clear()
    assets.install(["fake-gemma"], log=messages.append)
    assert messages[0] == "assembling fake.gguf (1 MB) from 4 chunks" and len(conversions) == 1
    assert gguf.read_bytes() == data


def test_a_corrupted_chunk_is_refused_and_its_wheel_removed(home, chunked):
    asset, data, _ = chunked
    wheel = home / "wheels/fake_gguf_part3-1.0.0-py3-none-any.whl"
    good = wheel.read_bytes()
    member = asset.gguf.chunks[2][1].member
    _wheel(wheel, {member: data[600_000:900_000][::-1]})  # right size, wrong content
    with pytest.raises(
        RuntimeError,
        match=r"^fake\.gguf\.part02 in fake_gguf_part3-1\.0\.0-py3-none-any\.whl has SHA-256 \w+\.\.\., expected "
        r"\w+\.\.\.; the wheel was removed: run `mhee assets install fake-gemma` to download it again$",
    ):
        assets.install(["fake-gemma"], log=lambda _: None)
    assert not wheel.exists()  # so that the next install fetches it again
    assert sorted(p.name for p in (home / "gguf/fake").iterdir()) == ["TERMS.html"]  # no partial, no GGUF
    wheel.write_bytes(good)  # what a fresh download brings
    assets.install(["fake-gemma"], log=lambda _: None)
    assert (home / "gguf/fake/fake.gguf").read_bytes() == data


def test_an_interrupted_assembly_or_conversion_resumes(home, chunked, monkeypatch):
    asset, data, conversions = chunked
    copied = []
    copy_checked = wheels._copy_checked

    def interrupted(src, out, chunk, whole):
        if len(copied) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third chunk
        copied.append(chunk)
        return copy_checked(src, out, chunk, whole)

    monkeypatch.setattr(wheels, "_copy_checked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.install(["fake-gemma"], log=lambda _: None)
    partial = home / "gguf/fake/fake.gguf.partial"
    assert partial.stat().st_size == CHUNK_SIZES[0] + CHUNK_SIZES[1] and not (home / "gguf/fake/fake.gguf").exists()
    assert next(r for r in assets.status() if r["name"] == "fake-gemma")["state"] == "missing"
    monkeypatch.setattr(wheels, "_copy_checked", copy_checked)

    def failing(gguf, out, log):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C during the conversion

    monkeypatch.setitem(assets.ASSETS, "fake-gemma", dataclasses.replace(asset, convert=failing))
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        assets.install(["fake-gemma"], log=messages.append)
    assert not any(m.startswith(("downloading", "extracting")) for m in messages)  # the wheels and terms are reused
    assert "assembling fake.gguf (1 MB) from 4 chunks" in messages and not partial.exists()
    assert (home / "gguf/fake/fake.gguf").read_bytes() == data
    assert list((home / "models").iterdir()) == []  # no half-converted folder

    monkeypatch.setitem(assets.ASSETS, "fake-gemma", asset)
    messages.clear()
    assets.install(["fake-gemma"], log=messages.append)
    assert [m.split(" (")[0] for m in messages] == ["converting fake.gguf to safetensors", "converted in 0 s",
                                                    "ok  fake-gemma: a fake chunked model"]  # fmt: skip
    assert len(conversions) == 1 and assets.verified_model_dir("fake-gemma")[0] == home / "models/fake"


def test_a_plain_install_leaves_optional_assets_out(home, chunked, monkeypatch):
    asset, _, conversions = chunked
    monkeypatch.setattr(assets, "ASSETS", {"fake-gemma": asset})
    messages: list[str] = []
    assets.install(log=messages.append)
    assert messages == [] and not (home / "gguf/fake").exists()
    assets.install(["all"], log=messages.append)
    assert messages[-1] == "ok  fake-gemma: a fake chunked model" and len(conversions) == 1
