"""The `mhee` command: plugins, assets, demo, eval, report, finetune."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """Plain-text table with a header row, columns padded to their widest cell."""
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column), *(len(r[i]) for r in cells)]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(w) for column, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from mhee_sdk.registry import get_registry

    registry = get_registry()
    if args.json:
        payload = {
            "entries": registry.records(),
            "plugins": [
                {"name": p.name, "version": p.version, "hooks": list(p.hooks), "source": p.source}
                for p in registry.plugins
            ],
            "failures": [{"name": f.name, "error": f.error} for f in registry.failures],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(format_table(registry.records(), ["name", "kind", "plugin", "version"]))
    for failure in registry.failures:
        print(f"\nskipped plugin {failure.name!r}: {failure.error}", file=sys.stderr)
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from mhee_sdk import assets

    if args.action == "install":
        assets.install(args.names or None)
        return 0
    rows = assets.status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["name", "state", "default", "source", "location"]))
    # an optional asset (default "no") that was never installed is no failure; a damaged one is
    failed = [r for r in rows if r["state"] == "damaged" or (r["state"] == "missing" and r["default"] == "yes")]
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mhee_sdk.demo import run_demo

    run_demo(samples=args.samples, out_dir=args.out, backbone=args.backbone, dtype=args.dtype, device=args.device)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mhee_sdk.config import RunConfig
    from mhee_sdk.evaluation import evaluate
    from mhee_sdk.report import format_runs, runs_table
    from mhee_sdk.store import Store

    config = RunConfig.from_toml(args.config)
    config = config.replace(**{name: getattr(args, name) for name in ("dtype", "device") if getattr(args, name)})
    store = Store.open(args.store)
    result = evaluate(config, store=store)
    print(format_runs(runs_table(store, [result.run_id])))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from mhee_sdk.demo import DEMO_CONFIG
    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.finetune import FinetuneConfig

    config = DEMO_CONFIG.replace(train_requests=args.train_requests, head=args.head)
    settings = FinetuneConfig(
        lora=not args.no_lora, soft_tokens=args.soft_tokens, epochs=args.epochs, max_minutes=args.minutes
    )
    started = time.perf_counter()
    report = Experiment(config).finetune(args.name, settings)
    print(
        f"adapter {args.name!r}: job {(time.perf_counter() - started) / 60:.1f} min of a {args.minutes:g}-minute "
        f"budget, {report.steps} training steps in {report.minutes:.1f} min "
        f"(mean loss of the first / last 20 steps {report.first_loss:.4f} -> {report.last_loss:.4f}); "
        f"use backbone 'smollm2-135m+lora:{args.name}'"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mhee_sdk.report import format_runs, runs_table, write_plots
    from mhee_sdk.store import Store

    store = Store.open(args.store, read_only=True)
    table = runs_table(store, args.run_ids or None)
    if table.empty:
        print(f"no finished runs in {store.path}")
        return 1
    print(format_runs(table))
    paths = write_plots(store, table, args.out)
    print(f"\nwrote {len(paths)} plots to {args.out}/")
    return 0


def add_precision_options(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--dtype and --device (the backbone's precision and where it runs)."""
    from mhee_sdk.config import DTYPE_NAMES

    parser.add_argument("--dtype", default=default, choices=DTYPE_NAMES,
                        help="backbone precision (auto: bfloat16 where the hardware runs it natively, else float32)")
    parser.add_argument("--device", default=default, help="cpu, cuda or cuda:N (auto: CUDA when present)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mhee`."""
    parser = argparse.ArgumentParser(prog="mhee", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    plugins = sub.add_parser("plugins", help="list plugins and everything they registered")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    asset_cmd = sub.add_parser("assets", help="install or check the real model and data")
    asset_cmd.add_argument("action", choices=["install", "status"])
    asset_cmd.add_argument("names", nargs="*", help="assets to install (default: those marked default in "
                           "`mhee assets status`; all: every asset)")  # fmt: skip
    asset_cmd.add_argument("--json", action="store_true", help="machine-readable status")
    asset_cmd.set_defaults(func=cmd_assets)

    demo = sub.add_parser("demo", help="run the end-to-end demo on MovieLens-100K with SmolLM2-135M")
    demo.add_argument("--samples", type=int, default=None, help="test requests to score (default: see output)")
    demo.add_argument("--out", default="demo_out", help="folder for the DuckDB file and plots")
    demo.add_argument("--backbone", default=None, help="registered backbone name (default smollm2-135m; tiny: quick)")
    add_precision_options(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("eval", help="evaluate one run config (TOML) and record it in the store")
    run.add_argument("config", help="path to a TOML run config (see docs/cli.md)")
    run.add_argument("--store", default="mhee_runs.duckdb", help="DuckDB store file")
    add_precision_options(run, default=None)
    run.set_defaults(func=cmd_eval)

    tune = sub.add_parser("finetune", help="LoRA / soft-token fine-tuning with the exit-head loss (CPU: < 1 h)")
    tune.add_argument("--name", default="demo", help="adapter name (the demo uses 'demo' when it exists)")
    tune.add_argument("--train-requests", type=int, default=1500, help="training requests (one pass each epoch)")
    tune.add_argument("--epochs", type=int, default=1)
    tune.add_argument("--minutes", type=float, default=55.0, help="budget of the whole job (fit, train, re-fit)")
    tune.add_argument("--soft-tokens", type=int, default=0, help="collaborative soft tokens (CoLLM); 0 = off")
    tune.add_argument("--no-lora", action="store_true", help="train soft tokens and heads only")
    tune.add_argument("--head", default="hybrid", help="exit head kind trained jointly")
    tune.set_defaults(func=cmd_finetune)

    report = sub.add_parser("report", help="print the table of runs in a store and write plots")
    report.add_argument("run_ids", nargs="*", help="runs to show (default: all finished runs)")
    report.add_argument("--store", default="demo_out/mhee_runs.duckdb", help="DuckDB store file")
    report.add_argument("--out", default="report_out", help="folder for the plots")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mhee` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
