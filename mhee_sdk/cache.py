"""A disk cache of pooled hidden states that never hands out a damaged entry.

Each key has up to five files in the folder: ``KEY.npy`` (a committed entry) and ``KEY.json`` (its shape,
dtype, size and SHA-256); while it is being filled, ``KEY.partial.npy`` and ``KEY.progress.json`` (rows
written so far and a hash of each written chunk, so a resumed fill can trust them); ``KEY.lock``
serialises fills of one key across processes (``fcntl.flock``; the lock files stay, they are empty).

Reading verifies size, SHA-256, header and finiteness; a bad entry is reported with a warning naming the
file, removed, and read as absent, so the caller rebuilds it. Writing refuses non-finite rows, so a
committed entry always reads back. Committing renames the finished partial file into place after its
checksum is written: a reader sees the old state or the whole new entry, never half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mhee_sdk.assets import sha256

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class CacheEntryWarning(UserWarning):
    """A cache entry was damaged (or written by an older mhee-sdk) and was removed to be rebuilt."""


def _write_json(path: Path, record: dict) -> None:
    """Replace `path` atomically: a crash leaves the old or the new record, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


class Filling:
    """Rows of one entry being written in order; made by :meth:`HiddenStateCache.filling`."""

    rows_done: int  # rows already written (resume from here); == shape[0] when complete

    def __init__(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        rows_done: int,
        out: np.memmap | None,
        progress: Path | None,
        chunks: list,
    ) -> None:
        self.key, self.shape, self.dtype = key, shape, dtype
        self.rows_done = rows_done
        self._out, self._progress, self._chunks = out, progress, chunks

    def write(self, start: int, values: np.ndarray) -> None:
        """Write rows ``start .. start + len(values)``; they must be the next rows, and finite."""
        if self._out is None:
            raise ValueError(f"cache entry {self.key} is complete (another process filled it); nothing to write")
        values = np.asarray(values)
        if start != self.rows_done:
            raise ValueError(
                f"cache entry {self.key}: write rows in order; the next row is {self.rows_done}, got start={start}"
            )
        if values.shape[1:] != self.shape[1:] or start + len(values) > self.shape[0]:
            raise ValueError(
                f"cache entry {self.key}: rows {start}..{start + len(values) - 1} have shape "
                f"{values.shape}; the entry is {self.shape}"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, with the rows it hit
            stored = values.astype(self.dtype)
        finite = np.isfinite(stored.reshape(len(stored), -1)).all(axis=1)
        if not finite.all():
            bad = (start + np.flatnonzero(~finite)).tolist()
            raise ValueError(
                f"cache entry {self.key}: rows {bad[:10]}{' ...' if len(bad) > 10 else ''} are not finite (NaN or "
                f"inf once stored as {self.dtype}); the backbone produced them, so nothing was written"
            )
        end = start + len(stored)
        self._out[start:end] = stored
        self._out.flush()  # the rows are on disk before the progress record says so
        self._chunks.append([start, end, hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()[:16]])
        _write_json(
            self._progress, {"shape": list(self.shape), "dtype": self.dtype.str, "rows": end, "chunks": self._chunks}
        )
        self.rows_done = end


class HiddenStateCache:
    """Pooled hidden states on disk, one .npy entry per key, verified by checksum."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> dict[str, Path]:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"cache key {key!r} must be letters, digits, '_', '-' or '.' (a file name)")
        names = {"entry": ".npy", "meta": ".json", "partial": ".partial.npy", "progress": ".progress.json"}
        return {kind: self.folder / f"{key}{ext}" for kind, ext in {**names, "lock": ".lock"}.items()}

    def get(self, key: str) -> np.ndarray | None:
        """A verified read-only (mmap) array, or None when absent; a bad entry is reported, removed, and None."""
        paths = self._paths(key)
        if not paths["entry"].is_file():
            return None
        array, problem, inode = self._verified(paths)
        if problem is None:
            return array
        with self._locked(paths):  # remove only the entry judged bad, not one another process just committed
            if paths["entry"].is_file() and paths["entry"].stat().st_ino == inode:
                self._remove_bad(paths, problem)
        return None

    @contextmanager
    def filling(self, key: str, shape: tuple[int, ...], dtype=np.float16) -> Iterator[Filling]:
        """Fill an entry, exclusive per key across processes; resumes a valid partial; commits when complete.

        On an error inside the block the partial entry stays, to be resumed.
        """
        paths = self._paths(key)
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        with self._locked(paths):  # a second process waits here, then finds the entry complete
            if paths["entry"].is_file():
                array, problem, _ = self._verified(paths)
                if problem is None and array.shape == shape and array.dtype == dtype:
                    yield Filling(key, shape, dtype, shape[0], None, None, [])
                    return
                self._remove_bad(paths, problem or f"has shape {array.shape} {array.dtype}, expected {shape} {dtype}")
            out, rows, chunks = self._resume(paths, shape, dtype)
            fill = Filling(key, shape, dtype, rows, out, paths["progress"], chunks)
            try:
                yield fill
            finally:
                out.flush()
                fill._out = out = None  # unmap before the rename
            if fill.rows_done != shape[0]:
                raise ValueError(
                    f"filling cache entry {key} ended with {fill.rows_done} of {shape[0]} rows "
                    "written; the partial entry is kept and the next fill resumes it"
                )
            self._commit(paths, shape, dtype)

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _locked(self, paths: dict[str, Path]) -> Iterator[None]:
        with paths["lock"].open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, even if the process dies
            yield

    def _verified(self, paths: dict[str, Path]) -> tuple[np.ndarray | None, str | None, int]:
        """(array, None, inode) for a good entry, else (None, what is wrong, inode)."""
        entry = paths["entry"]
        inode, size = entry.stat().st_ino, entry.stat().st_size
        try:
            meta = json.loads(paths["meta"].read_text())
            expected = (int(meta["size"]), str(meta["sha256"]), tuple(meta["shape"]), np.dtype(meta["dtype"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"has no valid checksum record {paths['meta'].name} ({type(err).__name__}: {err})", inode
        if size != expected[0]:
            return None, f"has {size} bytes, expected {expected[0]} (truncated or overwritten)", inode
        if sha256(entry) != expected[1]:
            return None, "does not match its SHA-256 (altered or zeroed)", inode
        try:
            array = np.load(entry, mmap_mode="r")
        except ValueError as err:
            return None, f"is not a readable .npy file ({err})", inode
        if array.shape != expected[2] or array.dtype != expected[3]:
            return None, f"holds {array.shape} {array.dtype}, its record says {expected[2]} {expected[3]}", inode
        if not np.isfinite(array).all():
            return None, "holds NaN or inf values", inode
        return array, None, inode

    def _remove_bad(self, paths: dict[str, Path], problem: str) -> None:
        warnings.warn(
            f"hidden-state cache entry {paths['entry']} {problem}; removed, it is rebuilt",
            CacheEntryWarning,
            stacklevel=3,
        )
        paths["entry"].unlink()
        paths["meta"].unlink(missing_ok=True)

    def _resume(self, paths: dict[str, Path], shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.memmap, int, list]:
        """The partial file, the rows it validly holds, and their chunk hashes; a fresh one when none is usable."""
        problem = self._partial_problem(paths, shape, dtype)
        if problem is None:
            record = json.loads(paths["progress"].read_text())
            return np.lib.format.open_memmap(paths["partial"], mode="r+"), int(record["rows"]), record["chunks"]
        if problem != "absent":
            warnings.warn(
                f"partial hidden-state cache entry {paths['partial']} {problem}; starting it over",
                CacheEntryWarning,
                stacklevel=4,
            )
        paths["progress"].unlink(missing_ok=True)  # before the data: a crash must not pair old progress with new rows
        out = np.lib.format.open_memmap(paths["partial"], mode="w+", dtype=dtype, shape=shape)
        _write_json(paths["progress"], {"shape": list(shape), "dtype": dtype.str, "rows": 0, "chunks": []})
        return out, 0, []

    def _partial_problem(self, paths: dict[str, Path], shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        if not paths["partial"].is_file() or not paths["progress"].is_file():
            return "absent" if not paths["partial"].is_file() else "has no progress record"
        try:
            record = json.loads(paths["progress"].read_text())
            rows, chunks = int(record["rows"]), record["chunks"]
            partial = np.load(paths["partial"], mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"is unreadable ({type(err).__name__}: {err})"
        if partial.shape != shape or partial.dtype != dtype or tuple(record["shape"]) != shape:
            return f"holds {partial.shape} {partial.dtype}, this fill needs {shape} {dtype}"
        covered = 0
        for start, end, digest in chunks:
            written = np.ascontiguousarray(partial[start:end])
            if start != covered or hashlib.sha256(written.tobytes()).hexdigest()[:16] != digest:
                return f"rows {start}..{end - 1} do not match their recorded hash (damaged)"
            covered = end
        if covered != rows:
            return f"records {rows} rows but hashes of {covered}"
        return None

    def _commit(self, paths: dict[str, Path], shape: tuple[int, ...], dtype: np.dtype) -> None:
        with paths["partial"].open("rb") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it the entry
        record = {
            "shape": list(shape),
            "dtype": dtype.str,
            "size": paths["partial"].stat().st_size,
            "sha256": sha256(paths["partial"]),
        }
        _write_json(paths["meta"], record)  # first: an entry without its record would read as damaged
        os.replace(paths["partial"], paths["entry"])
        paths["progress"].unlink()
