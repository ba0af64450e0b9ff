from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mhee_sdk.cache import CacheEntryWarning, HiddenStateCache

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (50, 3, 8)


def _data(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, SHAPE).astype(np.float16)


def _fill(cache: HiddenStateCache, key: str, data: np.ndarray, batch: int = 16, stop_after: int | None = None) -> int:
    """The caller's loop; returns how many batches it wrote."""
    written = 0
    with cache.filling(key, data.shape) as fill:
        for start in range(fill.rows_done, len(data), batch):
            if written == stop_after:
                raise KeyboardInterrupt
            fill.write(start, data[start : start + batch].astype(np.float32))
            written += 1
    return written


def test_fill_then_get_a_verified_read_only_entry(tmp_path):
    cache = HiddenStateCache(tmp_path / "hidden")
    assert cache.get("k1") is None
    data = _data()
    assert _fill(cache, "k1", data) == 4
    hit = cache.get("k1")
    np.testing.assert_array_equal(hit, data)
    assert isinstance(hit, np.memmap) and not hit.flags.writeable
    assert sorted(p.name for p in (tmp_path / "hidden").iterdir()) == ["k1.json", "k1.lock", "k1.npy"]
    with pytest.raises(ValueError, match=r"cache key '\.\./x' must be"):
        cache.get("../x")


def _nan_with_matching_record(entry: Path) -> None:
    array = np.load(entry)
    array[7] = np.nan
    np.save(entry, array)
    meta = json.loads(entry.with_suffix(".json").read_text())
    from mhee_sdk.assets import sha256

    meta["sha256"], meta["size"] = sha256(entry), entry.stat().st_size
    entry.with_suffix(".json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes, expected"),
    "zeroed": (lambda p: p.write_bytes(bytes(p.stat().st_size)), "does not match its SHA-256"),
    "NaN-filled": (
        lambda p: p.write_bytes(p.read_bytes()[:128] + b"\xff\x7f" * ((p.stat().st_size - 128) // 2)),
        "does not match its SHA-256",
    ),
    "NaN with a matching record": (_nan_with_matching_record, "holds NaN or inf values"),
    "one byte altered": (
        lambda p: p.write_bytes(p.read_bytes()[:-5] + bytes([p.read_bytes()[-5] ^ 1]) + p.read_bytes()[-4:]),
        "does not match its SHA-256",
    ),
    "record missing": (lambda p: p.with_suffix(".json").unlink(), "has no valid checksum record"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_entry_is_reported_removed_and_rebuilt(tmp_path, damage):
    cache = HiddenStateCache(tmp_path)
    data = _data()
    _fill(cache, "k", data)
    entry = tmp_path / "k.npy"
    spoil, message = DAMAGE[damage]
    spoil(entry)
    with pytest.warns(CacheEntryWarning, match=rf"entry {entry} .*{message}.*removed, it is rebuilt"):
        assert cache.get("k") is None
    assert not entry.exists()
    assert _fill(cache, "k", data) == 4
    np.testing.assert_array_equal(cache.get("k"), data)


def test_write_refuses_non_finite_and_out_of_order_rows(tmp_path):
    cache = HiddenStateCache(tmp_path)
    data = _data().astype(np.float32)
    with pytest.raises(KeyboardInterrupt), cache.filling("k", SHAPE) as fill:
        fill.write(0, data[:10])
        bad = data[10:20].copy()
        bad[3, 1, 2] = np.nan
        bad[5, 0, 0] = 1e6  # finite in float32, inf in float16
        with pytest.raises(ValueError, match=r"rows \[13, 15\] are not finite .*float16.*nothing was written"):
            fill.write(10, bad)
        with pytest.raises(ValueError, match="write rows in order; the next row is 10, got start=20"):
            fill.write(20, data[20:30])
        with pytest.raises(ValueError, match=r"have shape \(10, 3, 9\); the entry is \(50, 3, 8\)"):
            fill.write(10, np.zeros((10, 3, 9)))
        assert fill.rows_done == 10
        raise KeyboardInterrupt
    with cache.filling("k", SHAPE) as fill:
        assert fill.rows_done == 10  # the refused rows left nothing behind
        fill.write(10, data[10:])
    np.testing.assert_array_equal(cache.get("k"), data.astype(np.float16))


def test_an_interrupted_fill_resumes_and_a_damaged_partial_starts_over(tmp_path):
    cache = HiddenStateCache(tmp_path)
    data = _data()
    with pytest.raises(KeyboardInterrupt):
        _fill(cache, "k", data, batch=10, stop_after=3)
    assert cache.get("k") is None and (tmp_path / "k.partial.npy").is_file()
    assert _fill(cache, "k", data, batch=10) == 2  # rows 30..49 only
    np.testing.assert_array_equal(cache.get("k"), data)

    with pytest.raises(KeyboardInterrupt):
        _fill(cache, "j", data, batch=10, stop_after=3)
    partial = tmp_path / "j.partial.npy"
    raw = bytearray(partial.read_bytes())
    raw[200] ^= 0xFF  # inside the written rows
    partial.write_bytes(bytes(raw))
    with pytest.warns(CacheEntryWarning, match=r"partial hidden-state cache entry .*j.partial.npy rows 0..9 do not"):
        assert _fill(cache, "j", data, batch=10) == 5
    np.testing.assert_array_equal(cache.get("j"), data)


def test_an_unfinished_block_keeps_the_partial(tmp_path):
    cache = HiddenStateCache(tmp_path)
    with (
        pytest.raises(ValueError, match="ended with 16 of 50 rows written; the partial entry is kept"),
        cache.filling("k", SHAPE) as fill,
    ):
        fill.write(0, _data()[:16])
    assert cache.get("k") is None
    with cache.filling("k", SHAPE) as fill:
        assert fill.rows_done == 16
        fill.write(16, _data()[16:])
    np.testing.assert_array_equal(cache.get("k"), _data())


# A process filling key "shared" slowly (0.05 s per batch of 5 rows); prints how many batches it wrote and
# the SHA-256 of what it then reads.
FILLER = textwrap.dedent(
    """
    import hashlib, sys, time
    import numpy as np
    from mhee_sdk.cache import HiddenStateCache

    cache = HiddenStateCache(sys.argv[1])
    data = np.random.default_rng(0).normal(0, 3, (50, 3, 8)).astype(np.float16)
    written = 0
    if cache.get("shared") is None:
        with cache.filling("shared", data.shape) as fill:
            print("filling from", fill.rows_done, flush=True)
            for start in range(fill.rows_done, 50, 5):
                time.sleep(0.05)
                fill.write(start, data[start : start + 5])
                written += 1
    print("wrote", written, hashlib.sha256(np.ascontiguousarray(cache.get("shared")).tobytes()).hexdigest(), flush=True)
    """
)


def _filler(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FILLER, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_two_processes_filling_one_key_get_the_same_entry(tmp_path):
    first, second = _filler(tmp_path), _filler(tmp_path)
    outs = [proc.communicate(timeout=120) for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0], outs
    results = [out.splitlines()[-1].split() for out, _ in outs]
    assert results[0][2] == results[1][2]  # identical content
    assert sorted(int(r[1]) for r in results) == [0, 10]  # the second waited (or came later) and found it complete
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob("*.progress*"))
    np.testing.assert_array_equal(HiddenStateCache(tmp_path).get("shared"), _data())


def test_a_fill_killed_with_sigkill_resumes(tmp_path):
    proc = _filler(tmp_path)
    assert proc.stdout.readline().startswith("filling from 0")
    progress = tmp_path / "shared.progress.json"
    while not progress.is_file() or json.loads(progress.read_text())["rows"] < 15:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    cache = HiddenStateCache(tmp_path)
    assert cache.get("shared") is None
    with cache.filling("shared", SHAPE) as fill:
        assert 15 <= fill.rows_done < 50
        for start in range(fill.rows_done, 50, 5):
            fill.write(start, _data()[start : start + 5])
    np.testing.assert_array_equal(cache.get("shared"), _data())
