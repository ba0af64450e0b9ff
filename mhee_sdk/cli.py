"""The `mhee` command: plugins, assets, store, data check, demo, eval, report, finetune.

Starting it imports nothing heavy (torch, pandas, DuckDB load inside the commands that need them), so
``mhee --help`` is instant. A user error prints one line, ``Error: <what>; <the fix>``, on stderr and
exits with status 1 (2 for a wrong command line); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mhee_sdk.console import UserError, describe_error, format_table, print_json, show_warning, table_records
from mhee_sdk.validation import check_config, did_you_mean

BROKEN_PIPE_STATUS = 141  # what a shell reports for a program ended by SIGPIPE (`mhee plugins --json | head -1`)


# --------------------------------------------------------------------------- output
def _logger(args: argparse.Namespace) -> Callable[[str], None] | None:
    """Where narrative lines go: stdout, stderr when stdout carries JSON, nowhere with --quiet."""
    if args.quiet:
        return None
    if args.json:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: print(line, flush=True)


def _note(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(f"Note: {line}", file=sys.stderr)


# --------------------------------------------------------------------------- commands
def cmd_plugins(args: argparse.Namespace) -> int:
    from mhee_sdk.registry import get_registry

    registry = get_registry()
    if args.json:
        print_json({
            "entries": registry.records(),
            "plugins": [
                {"name": p.name, "version": p.version, "hooks": list(p.hooks), "source": p.source}
                for p in registry.plugins
            ],
            "failures": [{"name": f.name, "error": f.error} for f in registry.failures],
        })  # fmt: skip
        return 0
    print(format_table(registry.records(), ["name", "kind", "plugin", "version"]))
    for failure in registry.failures:
        print(f"\nskipped plugin {failure.name!r}: {failure.error}", file=sys.stderr)
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from mhee_sdk import assets

    if args.action == "install":
        assets.install(args.names or None, log=_logger(args) or (lambda line: None))
        return 0
    if args.action == "verify":
        problems = assets.verify(args.names or None)  # one line per damaged or missing file, naming the fix
        if args.json:
            print_json({"problems": problems})
        else:
            print("\n".join(problems) or "every installed file has its recorded size and SHA-256")
        return 1 if problems else 0
    rows = assets.status()
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows, ["name", "state", "default", "source", "location"]))
    # an optional asset (default "no") that was never installed is no failure; a damaged one is
    failed = [r for r in rows if r["state"] == "damaged" or (r["state"] == "missing" and r["default"] == "yes")]
    return 1 if failed else 0


def cmd_store(args: argparse.Namespace) -> int:
    from mhee_sdk.store import Store

    _require_store_file(args.store)
    repaired = Store.open(args.store).repair()
    for run_id, reason in repaired:
        print(f"marked failed: {run_id} ({reason})")
    if not repaired:
        print(f"no abandoned runs in {args.store}")
    return 0


def _dataset_params(args: argparse.Namespace) -> dict[str, object]:
    """``dataset_params`` from `mhee data check` flags (only those given)."""
    params: dict[str, object] = {}
    for flag in ("query", "format", "sep", "user", "item", "timestamp", "label", "rating", "like_threshold",
                 "item_key", "user_key"):  # fmt: skip
        if getattr(args, flag) is not None:
            params[flag] = getattr(args, flag)
    for flag in ("item_columns", "user_columns"):
        if getattr(args, flag) is not None:
            params[flag] = [name.strip() for name in getattr(args, flag).split(",") if name.strip()]
    if args.items is not None:
        params["items_path"] = args.items
    if args.users is not None:
        params["users_path"] = args.users
    if args.fractions is not None:
        params["fractions"] = [float(x) for x in args.fractions.split(",")]
    return params


def cmd_data(args: argparse.Namespace) -> int:
    from mhee_sdk.data.check import format_summary, summarize_dataset
    from mhee_sdk.data.interactions import InteractionsDataset

    cold = args.cold
    if args.config is not None:
        from mhee_sdk.config import RunConfig
        from mhee_sdk.registry import get_registry

        config = RunConfig.from_toml(args.config)
        cold = cold if cold is not None else config.cold_threshold
        params = {**config.dataset_params, **_dataset_params(args)}
        if args.path is not None:
            params["path"] = args.path
        dataset = get_registry().create("dataset", config.dataset, **params)
        source = str(params.get("path") or config.dataset)
    else:
        if args.path is None and args.query is None:
            raise UserError("give the log's PATH, --query SQL, or --config run.toml")
        dataset = InteractionsDataset(args.path, **_dataset_params(args))
        source = str(args.path or "the query")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # summarize_dataset collects the data warnings itself
        summary = summarize_dataset(dataset, cold if cold is not None else 5, source=source)
    print(format_summary(summary))
    for warning in summary.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mhee_sdk.demo import run_demo
    from mhee_sdk.report import runs_table

    log = _logger(args)
    result = run_demo(
        samples=args.samples, out_dir=args.out, backbone=args.backbone, dtype=args.dtype, device=args.device,
        prompt_tokens=args.prompt_tokens,
        train_requests=args.train_requests, valid_requests=args.valid_requests, log=log,
        show=None if args.json else print, progress=not args.quiet,
    )  # fmt: skip
    if args.json:
        from mhee_sdk.store import Store

        table = runs_table(Store.open(result.store, read_only=True), result.run_ids)
        print_json({"store": result.store, "runs": table_records(table), "plots": result.plots,
                    "notes": result.notes})  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mhee_sdk.config import RunConfig, read_toml
    from mhee_sdk.registry import get_registry

    values = read_toml(args.config)
    chosen = ("dtype", "device", "executor", "ray_address", "num_workers")  # flags override the config's
    values.update({name: getattr(args, name) for name in chosen if getattr(args, name)})
    _require_store_folder(args.store)
    registry = get_registry()
    check_config(values, registry, source=args.config)  # every problem at once, before any data or model loads
    config = RunConfig.from_dict(values)

    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.report import format_runs, format_slices, runs_table
    from mhee_sdk.store import Store

    store = Store.open(args.store)  # a store that cannot be written fails now, not after the run
    experiment = Experiment(config, registry, progress=not args.quiet)
    # backbones whose depth is not known before loading: the layer checks run now, before any hidden states
    check_config(config, registry, source=args.config, num_layers=experiment.backbone.num_layers)
    experiment.fit_heads()
    requests = experiment.requests()
    notes = []
    if len(requests) < config.eval_requests:
        notes.append(
            f"split {config.split!r} has {len(requests)} requests: eval_requests={config.eval_requests} "
            f"was clamped to {len(requests)}"
        )
    for note in notes:
        _note(args, note)
    result = experiment.run(store=store, requests=requests, name=config.name)
    table = runs_table(store, [result.run_id])
    if args.json:
        print_json({"store": store.path, "run": table_records(table)[0], "metrics": result.metrics, "notes": notes})
    else:
        print(format_runs(table))
        print()
        print(format_slices(table))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from mhee_sdk.demo import DEMO_CONFIG
    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.finetune import FinetuneConfig

    config = DEMO_CONFIG.replace(train_requests=args.train_requests, head=args.head)
    settings = FinetuneConfig(
        lora=not args.no_lora, soft_tokens=args.soft_tokens, epochs=args.epochs, max_minutes=args.minutes,
        progress=not args.quiet,
    )  # fmt: skip
    started = time.perf_counter()
    report = Experiment(config, progress=not args.quiet).finetune(args.name, settings)
    print(
        f"adapter {args.name!r}: job {(time.perf_counter() - started) / 60:.1f} min of a {args.minutes:g}-minute "
        f"budget, {report.steps} training steps in {report.minutes:.1f} min "
        f"(mean loss of the first / last 20 steps {report.first_loss:.4f} -> {report.last_loss:.4f}); "
        f"use backbone 'smollm2-135m+lora:{args.name}'"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _require_store_file(args.store)
    from mhee_sdk.report import format_runs, format_slices, runs_table, write_plots
    from mhee_sdk.store import Store

    store = Store.open(args.store, read_only=True)
    table = runs_table(store, args.run_ids or None)
    if table.empty:
        raise UserError(f"no finished runs in {store.path}; record some with `mhee eval CONFIG` or `mhee demo`")
    paths = write_plots(store, table, args.out)
    if args.json:
        print_json({"store": store.path, "runs": table_records(table), "plots": paths})
        return 0
    print(format_runs(table))
    print()
    print(format_slices(table))
    print(f"\nwrote {len(paths)} plots to {args.out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mhee_sdk.export import ExtraNotInstalled, export_mlflow
    from mhee_sdk.store import Store

    _require_store_file(args.store)
    try:
        exported = export_mlflow(Store.open(args.store, read_only=True), args.run_ids or None,
                                 tracking_uri=args.tracking_uri, experiment=args.experiment)  # fmt: skip
    except ExtraNotInstalled as err:
        raise UserError(str(err)) from err
    for run in exported:
        state = "exported" if run.new else "already in MLflow"
        print(f"{run.name} ({run.run_id}): {state} as MLflow run {run.mlflow_run_id}")
    new = sum(run.new for run in exported)
    print(f"{new} of {len(exported)} runs newly exported to MLflow experiment {args.experiment!r}")
    return 0


def _require_store_file(path: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"store {path!r} is a folder; pass the DuckDB file with --store FILE")
    if not Path(path).is_file():
        raise UserError(f"store file {path!r} not found; record runs with `mhee eval` or `mhee demo`, or pass --store")


def _require_store_folder(path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"folder {str(folder)!r} of --store {path!r} does not exist; create it or pick another path")
    if Path(path).is_dir():
        raise UserError(f"store {path!r} is a folder; pass a file name with --store FILE")


# --------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (and a did-you-mean for a misspelled command)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            message = f"{message}{did_you_mean(match.group(1), choices)}"
        self.exit(2, f"Error: {message}; see `{self.prog} --help`\n")


class _Version(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import version

        print(f"mhee {version('mhee-sdk')}")
        parser.exit()


def _global_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # on the main parser with defaults, on each subcommand without (so `mhee eval x --quiet` works too)
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show the Python traceback of an error")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress output (results and errors only)")  # fmt: skip


EXAMPLES = {
    "plugins": "examples:\n  mhee plugins\n  mhee plugins --json | jq '.entries[].name'\n"
    "  MHEE_STRICT_PLUGINS=1 mhee plugins    # fail on a broken plugin instead of skipping it",
    "assets": "examples:\n  mhee assets install\n  mhee assets status --json\n  mhee assets verify smollm2-135m\n"
    "  mhee assets install gemma3-270m    # optional second model: ~1.3 GB on disk, minutes to convert",
    "store": "examples:\n  mhee store repair --store demo_out/mhee_runs.duckdb",
    "data": "examples:\n  mhee data check clicks.csv --label clicked --item-columns title,category\n"
    "  mhee data check --config run.toml",
    "demo": "examples:\n  mhee demo --backbone tiny --samples 20    # the real code path in about a minute\n"
    "  mhee demo                                 # SmolLM2-135M: 16 min on 2 busy cores, first run\n"
    "  mhee demo --json > demo.json",
    "eval": "examples:\n  mhee eval run.toml\n  mhee eval run.toml --store runs.duckdb --json\n"
    "  mhee eval run.toml --executor ray --num-workers 2    # batches on a Ray actor pool (docs/cluster.md)\n\n"
    "run.toml:\n  backbone = \"tiny\"\n  policy = \"max-prob\"\n  policy_params = { threshold = 0.8 }\n"
    "(every key: docs/cli.md#run-config-toml)",
    "finetune": "examples:\n  mhee finetune --minutes 30\n  mhee finetune --name small --soft-tokens 4 --no-lora",
    "export": "examples:\n  mhee export mlflow --store demo_out/mhee_runs.duckdb\n"
    "  mhee export mlflow RUN_ID --tracking-uri sqlite:///mlflow.db --experiment mine",
    "report": "examples:\n  mhee report\n  mhee report --store runs.duckdb --out plots/\n"
    "  mhee report RUN_ID RUN_ID --json",
}


def add_precision_options(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--dtype and --device (the backbone's precision and where it runs)."""
    from mhee_sdk.config import DTYPE_NAMES

    parser.add_argument("--dtype", default=default, choices=DTYPE_NAMES,
                        help="backbone precision (auto: bfloat16 where the hardware runs it natively, else float32)")
    parser.add_argument("--device", default=default, help="cpu, cuda or cuda:N (auto: CUDA when present)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mhee`."""
    parser = Parser(prog="mhee", description=__doc__.split("\n\n")[0],
                    epilog="`mhee COMMAND --help` shows each command's options and examples.")  # fmt: skip
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _global_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                             formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        _global_flags(cmd, defaults=False)
        cmd.set_defaults(func=func)
        return cmd

    plugins = command("plugins", "list plugins and everything they registered", cmd_plugins)
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    asset_cmd = command("assets", "install, check or verify the real model and data", cmd_assets)
    asset_cmd.add_argument("action", choices=["install", "status", "verify"],
                           help="install; status (cheap check); verify (full SHA-256 of every file)")  # fmt: skip
    asset_cmd.add_argument("names", nargs="*", help="assets to act on (install default: those marked default in "
                           "`mhee assets status`; verify default: those and any optional one installed; "
                           "all: every asset)")  # fmt: skip
    asset_cmd.add_argument("--json", action="store_true", help="machine-readable output (status, verify)")

    store_cmd = command("store", "maintain a store: mark runs whose process is gone as failed", cmd_store)
    store_cmd.add_argument("action", choices=["repair"])
    store_cmd.add_argument("--store", default="mhee_runs.duckdb", help="DuckDB store file")

    data = command("data", "check your own interaction log before a run", cmd_data)
    data.add_argument("action", choices=["check"],
                      help="check: load a log exactly as dataset 'interactions' would and summarize it (users, items, "
                      "time, splits, cold start); a problem is one line naming the row or column and the fix")
    data.add_argument("path", nargs="?", help="CSV, TSV, Parquet or JSON-lines file (format from the extension)")
    data.add_argument("--query", help="instead of PATH: one DuckDB SELECT over files")
    data.add_argument("--config", help="a run config (TOML): check its dataset and dataset_params; flags override")
    data.add_argument("--format", choices=["csv", "tsv", "parquet", "jsonl", "json"], help="override the extension")
    data.add_argument("--sep", help="CSV column separator (default ',')")
    data.add_argument("--user", help="column of the user id (default 'user')")
    data.add_argument("--item", help="column of the item id (default 'item')")
    data.add_argument("--timestamp", help="column of the time: numbers or dates (default 'timestamp')")
    outcome = data.add_mutually_exclusive_group()
    outcome.add_argument("--label", help="column of a 0/1 outcome (click, purchase, like)")
    outcome.add_argument("--rating", help="column of a graded outcome; needs --like-threshold")
    data.add_argument("--like-threshold", type=float, help="ratings at or above it are liked")
    data.add_argument("--item-columns", help="comma-separated columns describing items (title,category,...)")
    data.add_argument("--user-columns", help="comma-separated columns describing users")
    data.add_argument("--items", help="side table of items (its id column: --item-key, default the --item name)")
    data.add_argument("--item-key", help="id column of --items")
    data.add_argument("--users", help="side table of users")
    data.add_argument("--user-key", help="id column of --users")
    data.add_argument("--fractions", help="train,valid,test shares of the time-ordered log (default 0.8,0.1,0.1)")
    data.add_argument("--cold", type=int, help="cold = fewer than this many training interactions (default 5)")

    demo = command("demo", "run the end-to-end demo on MovieLens-100K with SmolLM2-135M", cmd_demo)
    demo.add_argument("--samples", type=_positive_int, default=None, help="test requests to score (default 200)")
    demo.add_argument("--out", default="demo_out", help="folder for the DuckDB file and plots")
    demo.add_argument("--backbone", default=None, help="registered backbone name (default smollm2-135m; tiny: quick)")
    demo.add_argument("--prompt-tokens", type=_positive_int, default=None,
                      help="prompt budget in the backbone's tokens (default: what 160 SmolLM2 tokens hold)")
    demo.add_argument("--train-requests", type=_positive_int, default=None, help="head training requests (500)")
    demo.add_argument("--valid-requests", type=_positive_int, default=None, help="head validation requests (250)")
    demo.add_argument("--json", action="store_true", help="results as JSON on stdout; progress on stderr")
    add_precision_options(demo)

    run = command("eval", "evaluate one run config (TOML) and record it in the store", cmd_eval)
    run.add_argument("config", help="path to a TOML run config (see docs/cli.md)")
    run.add_argument("--store", default="mhee_runs.duckdb", help="DuckDB store file")
    run.add_argument("--json", action="store_true", help="the run's row and metrics as JSON; progress on stderr")
    add_precision_options(run, default=None)
    run.add_argument("--executor", choices=["local", "ray"], help="where batches run (default: the config's)")
    run.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else a new local one)")
    run.add_argument("--num-workers", type=_positive_int, help="Ray actors (default: as many as the CPUs fit)")

    tune = command("finetune", "LoRA / soft-token fine-tuning with the exit-head loss (CPU: < 1 h)", cmd_finetune)
    tune.add_argument("--name", default="demo", help="adapter name (the demo uses 'demo' when it exists)")
    tune.add_argument("--train-requests", type=_positive_int, default=1500,
                      help="training requests (one pass each epoch)")  # fmt: skip
    tune.add_argument("--epochs", type=_positive_int, default=1)
    tune.add_argument("--minutes", type=float, default=55.0, help="budget of the whole job (fit, train, re-fit)")
    tune.add_argument("--soft-tokens", type=int, default=0, help="collaborative soft tokens (CoLLM); 0 = off")
    tune.add_argument("--no-lora", action="store_true", help="train soft tokens and heads only")
    tune.add_argument("--head", default="hybrid", help="exit head kind trained jointly")

    report = command("report", "print the table of runs in a store and write plots", cmd_report)
    report.add_argument("run_ids", nargs="*", help="runs to show (default: all finished runs)")
    report.add_argument("--store", default="demo_out/mhee_runs.duckdb", help="DuckDB store file")
    report.add_argument("--out", default="report_out", help="folder for the plots")
    report.add_argument("--json", action="store_true", help="the runs and plot paths as JSON")

    export = command("export", "log finished runs to MLflow (params, metrics, plots); extra: mlflow", cmd_export)
    export.add_argument("target", choices=["mlflow"], help="where to export (only MLflow so far)")
    export.add_argument("run_ids", nargs="*", help="runs to export (default: every finished run)")
    export.add_argument("--store", default="demo_out/mhee_runs.duckdb", help="DuckDB store file")
    export.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    export.add_argument("--experiment", default="mhee-sdk", help="MLflow experiment (created when missing)")
    return parser


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mhee` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line per warning (restored when the block ends)
            from mhee_sdk.progress import silenced

            with silenced() if args.quiet else nullcontext():
                status = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (`| head -1`): stop quietly; point stdout at /dev/null so the final flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the last stop before a traceback: one line unless --debug asks for it
        if args.debug:
            raise
        message, _ = describe_error(err)
        print(f"Error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
