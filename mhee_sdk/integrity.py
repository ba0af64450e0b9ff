"""Is a file still what was recorded (size and SHA-256)? Checked in full, or cheaply on every load.

Small files are hashed in full on every check. A large one is trusted only while its size, mtime, ctime
and inode equal those recorded by its last full hash (taken well after the file last changed) and a
sample of its 1 MiB blocks (first, last and random ones) still hash as recorded. Any write to the file,
even one that restores its mtime, changes its ctime, so a changed file is hashed again; damage that
bypasses the file system (bit rot) is caught when it falls in a sampled block, and always by a full
check. A full hash that matches is remembered in a stamp next to the file (``<name>.verified.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

BLOCK = 1 << 20
SMALL_FILE = 16 << 20  # files up to this size are hashed in full on every check
_SAMPLED_BLOCKS = 6  # random 1 MiB blocks re-hashed per cheap check of a large file
_RACY_NS = 3_000_000_000  # a file changed this close to its last full hash is hashed again


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(BLOCK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def problem(path: Path, size: int | None, digest: str, full: bool = False) -> str | None:
    """What is wrong with `path` given its expected size and SHA-256, or None.

    Cheap unless `full`: see the module docstring. ``"is missing"`` when there is no such file.
    """
    if not path.is_file():
        return "is missing"
    stat = path.stat()
    if size is not None and stat.st_size != size:
        return f"has {stat.st_size} bytes, expected {size} (truncated or changed)"
    if not full and stat.st_size > SMALL_FILE:
        stamp = _read_stamp(path)
        known = stamp is not None and stamp.get("identity") == _identity(stat, digest) and _trusted(stamp, stat)
        if known and _sampled_blocks_match(path, stamp["blocks"]):
            return None
    found, blocks = _hash_blocks(path)
    if found != digest:
        return f"has SHA-256 {found[:12]}..., expected {digest[:12]}... (changed or damaged since install)"
    if stat.st_size > SMALL_FILE and os.access(path.parent, os.W_OK):  # a read-only cache is hashed each time
        stamp = {"identity": _identity(stat, digest), "verified_ns": time.time_ns(), "blocks": blocks}
        _stamp_path(path).write_text(json.dumps(stamp))
    return None


def is_stamp(path: Path) -> bool:
    """Whether `path` is a stamp this module wrote (not a file of the asset itself)."""
    return path.name.endswith(".verified.json")


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
        for chunk in iter(lambda: handle.read(BLOCK), b""):
            digest.update(chunk)
            blocks.append(hashlib.sha256(chunk).hexdigest()[:16])
    return digest.hexdigest(), blocks


def _sampled_blocks_match(path: Path, blocks: list[str]) -> bool:
    # the first block holds the safetensors header; random others cover the rest over many loads
    picks = {0, len(blocks) - 1, *random.sample(range(len(blocks)), min(_SAMPLED_BLOCKS, len(blocks)))}
    with path.open("rb") as handle:
        for index in sorted(picks):
            handle.seek(index * BLOCK)
            if hashlib.sha256(handle.read(BLOCK)).hexdigest()[:16] != blocks[index]:
                return False
    return True
