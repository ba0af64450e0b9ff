"""The fault sequence of issue 17, against real processes: does any fault lose data or end unclearly?

    python bench/faults.py [--batches 300]

Cases: a reader polling during a run (and the same run without it, for the writer's cost), two writers,
SIGTERM, SIGKILL and two SIGINTs 20 ms apart to a writer, a full disk (a 3 MB tmpfs; needs root), a
corrupted asset (MovieLens ratings and, when installed, the SmolLM2 weights), a corrupted hidden-state
cache entry, a crafted store (a `runs` view over `read_text('/etc/hostname')`) and a truncated store.
Writers are separate processes (this file with `--writer`) that drive `Store` with synthetic batches of
predictions, layer outputs and requests, as `Experiment.run` does, so the sequence needs no model.

Prints one row per case: outcome, predictions lost from finished runs (must be 0) and whether the error
was clear (a typed mhee error, not a raw DuckDB one, that names the file and the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [3, 6, 9]
FIRST_RUN = 40  # requests of the finished run every writer records before the one that is disturbed


def batch(start: int, rows: int) -> dict[str, pd.DataFrame]:
    """One batch of synthetic rows for every appendable table."""
    from mhee_sdk.testing import synthetic_batch

    return synthetic_batch(np.arange(start, start + rows), LAYERS)


def writer(path: str, batches: int, rows: int, pause: float, flush: float) -> None:
    """Worker: a finished run, then a run of `batches` batches; prints progress and its lock waits."""
    from mhee_sdk.store import Store
    from mhee_sdk.testing import synthetic_full_depth_run

    store = Store.open(path, flush_seconds=flush)
    print("finished", synthetic_full_depth_run(store, FIRST_RUN, LAYERS), flush=True)
    started = time.perf_counter()
    with store.recording({"policy": "never"}, LAYERS, 9, name="disturbed") as run_id:
        print("started", run_id, flush=True)
        for i in range(batches):
            store.append_batch(run_id, batch(i * rows, rows))
            print("batch", i, flush=True)
            time.sleep(pause)
    waits = store.lock_waits
    print("done", time.perf_counter() - started, waits.count, waits.max_s, waits.total_s, flush=True)


def reader(path: str, stop: str) -> None:
    """Worker: poll every 0.1 s like `mhee report`, printing per-run row counts read in one statement."""
    from mhee_sdk.store import Store, StoreError

    while not os.path.exists(stop):
        try:
            store = Store.open(path, read_only=True)
            store.runs(include_failed=True)
            counts = store.query(
                "SELECT r.run_id, (SELECT count(*) FROM predictions p WHERE p.run_id = r.run_id) AS p, "
                "(SELECT count(*) FROM requests q WHERE q.run_id = r.run_id) AS q, "
                "(SELECT count(*) FROM layer_outputs o WHERE o.run_id = r.run_id) AS o FROM runs r"
            )
            print(json.dumps(counts.to_dict("records")), flush=True)
        except StoreError as err:
            print("ERROR", err, flush=True)
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------- the driver
def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _spawn_writer(path: Path, batches: int, rows: int = 2, pause: float = 0.0, flush: float = 1.0):
    return _spawn("--writer", str(path), str(batches), str(rows), str(pause), str(flush))


def _read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split()[1:]
    raise RuntimeError(f"worker ended before {prefix!r}: {proc.stderr.read()[-2000:]}")


def _lost(path: Path, finished: list[tuple[str, int]]) -> int:
    """Predictions missing from runs that finished (with how many they should hold)."""
    from mhee_sdk.store import Store

    store = Store.open(path, read_only=True)
    return sum(expected - len(store.predictions(run_id)) for run_id, expected in finished)


def _clear(message: str, *needles: str) -> str:
    return "y" if all(n in message for n in needles) else "n"


def case_reader(folder: Path, batches: int) -> list[tuple]:
    """A run of `batches` 2-row batches with and without a reader polling every 0.1 s."""
    rows = []
    for flush in (1.0, 0.0):
        times = {}
        for polled in (False, True):
            path = folder / f"reader-{flush}-{polled}.duckdb"
            stop = folder / f"stop-{flush}-{polled}"
            poller = None
            if polled:
                from mhee_sdk.store import Store

                Store.open(path)
                poller = _spawn("--reader", str(path), str(stop))
            proc = _spawn_writer(path, batches, pause=0.01, flush=flush)  # 10 ms: a tiny-backbone batch
            first = _read_until(proc, "finished")[0]
            run_id = _read_until(proc, "started")[0]
            done = _read_until(proc, "done")
            proc.communicate(timeout=600)
            times[polled] = float(done[0])
            snapshots, errors = [], 0
            if poller is not None:
                stop.touch()
                out, _ = poller.communicate(timeout=120)
                errors = out.count("ERROR")
                snapshots = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
            seen = [r for s in snapshots for r in s if r["run_id"] == run_id]
            whole = all(r["p"] == r["q"] and r["o"] == 3 * r["p"] and r["p"] % 2 == 0 for r in seen)
            lost = _lost(path, [(first, FIRST_RUN), (run_id, 2 * batches)])
        outcome = (
            f"finished; writer {times[False]:.1f} s alone, {times[True]:.1f} s polled, {done[1]} lock waits "
            f"({float(done[3]):.1f} s, worst {float(done[2]) * 1000:.0f} ms); reader: {len(snapshots)} snapshots, "
            f"{errors} errors, "
            f"whole batches: {'yes' if whole else 'NO'}"
        )
        rows.append((f"reader during a run (flush {flush:g} s)", outcome, lost, "-" if not errors else "n"))
    return rows


def case_two_writers(folder: Path) -> list[tuple]:
    from mhee_sdk.store import Store, StoreBusyError

    path = folder / "two.duckdb"
    proc = _spawn_writer(path, 200, pause=0.01)
    first = _read_until(proc, "finished")[0]
    run_id = _read_until(proc, "started")[0]
    try:
        Store.open(path).start_run({}, LAYERS, 9)
        outcome, message = "second writer was NOT refused", ""
    except StoreBusyError as err:
        outcome, message = f"second refused: {str(err)[:90]}...", str(err)
    proc.communicate(timeout=600)
    status = Store.open(path, read_only=True).run(run_id)["status"]
    lost = _lost(path, [(first, FIRST_RUN), (run_id, 400)])
    return [("two writers", f"{outcome} first {status}", lost, _clear(message, str(path), run_id, "one writing run"))]


def case_signal(folder: Path, how: str) -> list[tuple]:
    from mhee_sdk.store import Store

    path = folder / f"{how.replace(' ', '-')}.duckdb"
    proc = _spawn_writer(path, 100_000, pause=0.005, flush=0.05)
    first = _read_until(proc, "finished")[0]
    run_id = _read_until(proc, "started")[0]
    for _ in range(20):
        proc.stdout.readline()
    if how == "double SIGINT":
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    proc.communicate(timeout=120)
    before = Store.open(path, read_only=True).run(run_id)
    repaired = Store.open(path).repair()  # open-time cleanup has already run; repair finds nothing left
    after = Store.open(path, read_only=True)
    record = after.run(run_id)
    outcome = (
        f"exit {proc.returncode}; run {before['status']} -> {record['status']} after a writable open; "
        f"running runs left: {after.status_counts()['running']}; repair() found {len(repaired)}"
    )
    expected = {"SIGTERM": "Terminated: SIGTERM", "SIGKILL": "abandoned: its process", "double SIGINT": "Keyboard"}
    return [(how, outcome, _lost(path, [(first, FIRST_RUN)]), _clear(record["error"] or "", expected[how]))]


def case_disk_full(folder: Path) -> list[tuple]:
    from mhee_sdk.store import Store, StoreError
    from mhee_sdk.testing import synthetic_full_depth_run

    disk = folder / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        return [("disk full", "skipped: mounting a 3 MB tmpfs needs root and `mount -t tmpfs`", "-", "-")]
    try:
        path = disk / "runs.duckdb"
        store = Store.open(path, flush_seconds=0)
        first = synthetic_full_depth_run(store, FIRST_RUN, LAYERS)
        message = ""
        try:
            with store.recording({}, LAYERS, 9) as run_id:
                for i in range(100_000):
                    store.append_batch(run_id, batch(500 * i, 500))
        except StoreError as err:
            message = str(err)
        status = store.run(run_id)["status"]
        outcome = f"StoreError after {i} batches; run {status}" + (
            " (abandoned once this process exits)" if status == "running" else ""
        )
        return [
            (
                "disk full (3 MB tmpfs)",
                outcome,
                _lost(path, [(first, FIRST_RUN)]),
                _clear(message, str(path), "is full", "free space"),
            )
        ]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def case_assets(folder: Path) -> list[tuple]:
    from mhee_sdk import assets

    real, previous = assets.home(), os.environ.get("MHEE_HOME")
    home = folder / "mhee-home"  # copies: the real cache is never touched
    data = home / assets.ASSETS[assets.MOVIELENS].folder
    data.mkdir(parents=True)
    os.environ["MHEE_HOME"] = str(home)
    rows = []
    try:
        for item in assets.ASSETS[assets.MOVIELENS].files:
            shutil.copy(real / assets.ASSETS[assets.MOVIELENS].folder / item.filename, data / item.filename)
        inter = data / "ml-100k.inter"
        load_inter = lambda: assets.asset_file(assets.MOVIELENS, "ml-100k.inter")  # noqa: E731
        inter.write_bytes(inter.read_bytes().replace(b"\t5\t", b"\t1\t", 1))
        rows.append(_expect_corrupt("corrupted asset: one rating changed", inter, load_inter))
        inter.write_bytes(inter.read_bytes()[:1000])
        rows.append(_expect_corrupt("corrupted asset: ratings truncated", inter, load_inter))
        source = real / assets.MODEL_FOLDER
        if (source / ".complete.json").is_file():
            shutil.copytree(source, home / assets.MODEL_FOLDER)
            weights = home / assets.MODEL_FOLDER / "model.safetensors"
            assets.verified_model_dir(assets.SMOLLM2)  # as installed: verified once, then cheap
            with weights.open("r+b") as handle:
                handle.seek(weights.stat().st_size // 2)
                handle.write(b"\x00\x01\x02\x03")
            load_model = lambda: assets.verified_model_dir(assets.SMOLLM2)  # noqa: E731
            rows.append(_expect_corrupt("corrupted asset: 4 bytes of SmolLM2 weights", weights, load_model))
        else:
            rows.append(("corrupted asset: SmolLM2 weights", "skipped: SmolLM2 is not installed", "-", "-"))
    finally:
        if previous is None:
            os.environ.pop("MHEE_HOME")
        else:
            os.environ["MHEE_HOME"] = previous
    return rows


def _expect_corrupt(case: str, path: Path, load: Callable[[], object]) -> tuple:
    from mhee_sdk.assets import AssetCorruptError

    started = time.perf_counter()
    try:
        load()
        return (case, "NOT detected", "-", "n")
    except AssetCorruptError as err:
        took = time.perf_counter() - started
        return (
            case,
            f"AssetCorruptError at load ({took:.2f} s)",
            "-",
            _clear(str(err), str(path), "mhee assets install"),
        )


def case_cache(folder: Path) -> list[tuple]:
    from mhee_sdk.cache import CacheEntryWarning, HiddenStateCache

    cache = HiddenStateCache(folder / "hidden")
    data = np.random.default_rng(0).normal(0, 3, (200, 4, 16)).astype(np.float16)
    rows = []
    for damage in ("truncated", "zeroed", "NaN-filled"):
        with cache.filling(damage, data.shape) as fill:
            for start in range(0, 200, 32):
                fill.write(start, data[start : start + 32])
        entry = folder / "hidden" / f"{damage}.npy"
        raw = entry.read_bytes()
        entry.write_bytes(
            {
                "truncated": raw[: len(raw) // 2],
                "zeroed": bytes(len(raw)),
                "NaN-filled": raw[:128] + b"\xff\x7f" * ((len(raw) - 128) // 2),
            }[damage]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            missed = cache.get(damage) is not None
        with cache.filling(damage, data.shape) as fill:
            for start in range(fill.rows_done, 200, 32):
                fill.write(start, data[start : start + 32])
        rebuilt = np.array_equal(cache.get(damage), data)
        message = " ".join(str(w.message) for w in caught if w.category is CacheEntryWarning)
        outcome = "NOT detected" if missed else f"warned, removed, rebuilt {'equal' if rebuilt else 'DIFFERENT'}"
        rows.append((f"corrupted cache entry ({damage})", outcome, "-", _clear(message, str(entry), "rebuilt")))
    return rows


def case_crafted(folder: Path) -> list[tuple]:
    from mhee_sdk.store import Store, StoreError
    from mhee_sdk.testing import synthetic_full_depth_run

    rows = []
    path = folder / "crafted.duckdb"
    Store.open(path)
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE runs")
    con.execute("CREATE VIEW runs AS SELECT content AS run_id FROM read_text('/etc/hostname')")
    con.close()
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").is_file() else socket.gethostname()
    try:
        Store.open(path, read_only=True).runs()
        rows.append(("crafted store (runs = view over a file)", "OPENED", "-", "n"))
    except StoreError as err:
        leaked = hostname in str(err).replace(str(path), "")
        rows.append(
            (
                "crafted store (runs = view over a file)",
                f"refused; file content leaked: {leaked}",
                "-",
                _clear(str(err), str(path), "view runs"),
            )
        )
    path = folder / "query.duckdb"
    store = Store.open(path)
    run_id = synthetic_full_depth_run(store, FIRST_RUN, LAYERS)
    refused = 0
    for sql in (
        "DELETE FROM predictions",
        "UPDATE metrics SET value = 1",
        "DROP TABLE runs",
        "COPY runs TO 'x.csv'",
        "ATTACH 'x.duckdb'",
        f"SELECT * FROM read_text('{path}')",
    ):
        try:
            store.query(sql)
        except StoreError:
            refused += 1
    rows.append(
        (
            "query: DELETE/UPDATE/DROP/COPY/ATTACH/read_text",
            f"{refused} of 6 refused",
            _lost(path, [(run_id, FIRST_RUN)]),
            "y",
        )
    )
    path = folder / "truncated.duckdb"
    store = Store.open(path)
    for seed in range(3):
        synthetic_full_depth_run(store, 3000, LAYERS, seed=seed)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    try:
        store = Store.open(path, read_only=True)
        for run in store.runs(include_failed=True)["run_id"]:
            store.predictions(run)
        rows.append(("half-truncated store", "NOT detected", "-", "n"))
    except StoreError as err:
        rows.append(
            ("half-truncated store", "StoreError", "-", _clear(str(err), str(path), "restore it from a backup"))
        )
    return rows


def main() -> None:
    """Run every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="batches of the polled run")
    parser.add_argument("--writer", nargs=5, metavar=("PATH", "BATCHES", "ROWS", "PAUSE", "FLUSH"))
    parser.add_argument("--reader", nargs=2, metavar=("PATH", "STOP_FILE"))
    args = parser.parse_args()
    if args.writer:
        path, batches, rows, pause, flush = args.writer
        return writer(path, int(batches), int(rows), float(pause), float(flush))
    if args.reader:
        return reader(*args.reader)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        steps = [lambda: case_reader(folder, args.batches), lambda: case_two_writers(folder)]
        steps += [lambda how=how: case_signal(folder, how) for how in ("SIGTERM", "SIGKILL", "double SIGINT")]
        steps += [
            lambda: case_disk_full(folder),
            lambda: case_assets(folder),
            lambda: case_cache(folder),
            lambda: case_crafted(folder),
        ]
        for step in steps:
            started = time.perf_counter()
            for row in step():
                table.append(row)
                print(f"{row[0]}: {row[1]} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    widths = [max(len(str(row[i])) for row in [("case", "outcome", "lost", "clear"), *table]) for i in range(4)]
    header = ("case", "outcome", "predictions lost", "error clear")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
