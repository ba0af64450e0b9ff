"""Write docs/images/pareto.png, the README's first picture, from a store of demo runs.

    python docs/make_images.py [STORE] [--out docs/images]

STORE defaults to ``demo_out/mhee_runs.duckdb``, what ``make demo`` writes (real model, real numbers). When
it does not exist, the script first runs the demo's policies and baselines with the tiny backbone at the
sizes tutorial 01 uses for it, into a temporary store: the picture then shows the layout only (a random
model's numbers mean nothing). The widget screenshots come
from the browser test: ``MHEE_SCREENSHOTS=docs/images pytest tests/test_browser.py`` (``make images`` runs
both).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mhee_sdk.report import runs_table, write_plots
from mhee_sdk.store import Store

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000  # committed images stay small


def make_pareto(store_path: Path, out: Path) -> Path:
    """Copy the Pareto plot of every finished run in the store to `out`/pareto.png."""
    store = Store.open(store_path, read_only=True)
    with tempfile.TemporaryDirectory() as folder:
        written = write_plots(store, runs_table(store), folder)[0]  # the first is the Pareto plot
        out.mkdir(parents=True, exist_ok=True)
        target = out / "pareto.png"
        shutil.copyfile(written, target)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size} bytes, over {MAX_BYTES}: lower the dpi in mhee_sdk.report.write_plots")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default=ROOT / "demo_out" / "mhee_runs.duckdb", type=Path)
    parser.add_argument("--out", default=ROOT / "docs" / "images", type=Path)
    args = parser.parse_args()
    if args.store.is_file():
        print(f"Pareto plot from {args.store}")
        print(f"wrote {make_pareto(args.store, args.out)}")
        return
    print(f"no store at {args.store}: the demo's runs with the tiny backbone (layout only, random numbers)")
    with tempfile.TemporaryDirectory() as folder:
        print(f"wrote {make_pareto(tiny_demo_store(Path(folder)), args.out)}")


def tiny_demo_store(folder: Path) -> Path:
    """The demo's runs (full depth, its policies and baselines) with the tiny backbone, in `folder`."""
    from mhee_sdk.demo import DEMO_BASELINES, DEMO_CONFIG, DEMO_POLICIES
    from mhee_sdk.evaluation import Experiment

    # tutorial 01's tiny sizes: byte tokens need a longer prompt; a head after each of the 6 layers
    config = DEMO_CONFIG.replace(backbone="tiny", prompt_tokens=300, exit_layers=[1, 2, 3, 4, 5, 6],
                                 retriever_params={"mode": "users", "epochs": 5}, train_requests=100,
                                 valid_requests=60, eval_requests=40)  # fmt: skip
    experiment = Experiment(config, cache_dir=folder / "hidden")
    experiment.fit_heads()
    store = Store.open(folder / "mhee_runs.duckdb")
    experiment.run("never", store=store, name="full depth")
    for policy, params in DEMO_POLICIES:
        experiment.run(policy, params, store=store)
    for baseline in DEMO_BASELINES:
        experiment.run_baseline(baseline, {"epochs": 5} if baseline == "gcn-score" else None, store=store)
    return store.path


if __name__ == "__main__":
    main()
