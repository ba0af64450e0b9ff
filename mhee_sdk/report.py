"""Tables and plot files for runs in a store (what `mhee report` and `mhee demo` print and write)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mhee_sdk import plots
from mhee_sdk.data.split import SLICES, describe_slices
from mhee_sdk.metrics import SLICE_METRICS, slice_metric
from mhee_sdk.store import Store

COLUMNS = ["name", "kind", "auc", "gauc", "logloss", "mean_exit_layer", "layer_savings", "speedup", "speedup_p25",
           "speedup_p75", "requests", "run_id"]  # fmt: skip
SLICE_COLUMNS = [slice_metric(m, s) for s in SLICES for m in SLICE_METRICS]
CUT_POINTS = ["cold_threshold", "train_min@medium_users", "train_min@heavy_users"]


def runs_table(store: Store, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Finished runs (all, or the given ids in that order) with their headline metrics."""
    runs = store.runs()
    if run_ids:
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise ValueError(f"runs {missing} are not finished runs in {store.path}; see `mhee report` for the list")
        runs = runs.set_index("run_id").loc[list(run_ids)].reset_index()
    for column in COLUMNS + SLICE_COLUMNS + CUT_POINTS:
        if column not in runs:
            runs[column] = np.nan
    return runs[COLUMNS + SLICE_COLUMNS + CUT_POINTS].reset_index(drop=True)


def format_runs(table: pd.DataFrame) -> str:
    """Fixed-width text table: name, AUC, GAUC, LogLoss, mean exit layer, layer savings, measured speedup.

    The speedup is measured beside full depth in the same run (``Experiment.run_many``), with the
    middle half of its per-batch ratios; runs without one show "-".
    """
    width = max([len("run"), *(len(str(name)) for name in table["name"])]) + 2
    lines = [f"{'run':<{width}}{'AUC':>7}{'GAUC':>7}{'LogLoss':>9}{'mean exit':>11}{'savings':>9}"
             f"{'speedup (p25-p75)':>20}  run_id"]  # fmt: skip
    for row in table.itertuples():
        llm = row.kind != "baseline"
        exit_text = f"{row.mean_exit_layer:.1f}" if llm else "-"
        savings = f"{row.layer_savings:.2f}x" if llm and pd.notna(row.layer_savings) else "-"
        speed = "-"
        if pd.notna(row.speedup):
            speed = f"{row.speedup:.2f}x"
            if pd.notna(row.speedup_p25):
                speed += f" ({row.speedup_p25:.2f}-{row.speedup_p75:.2f})"
        lines.append(
            f"{row.name!s:<{width}}{row.auc:>7.3f}{row.gauc:>7.3f}{row.logloss:>9.3f}{exit_text:>11}{savings:>9}"
            f"{speed:>20}  {row.run_id}"
        )
    return "\n".join(lines)


def format_slices(table: pd.DataFrame) -> str:
    """Per run, the AUC on each slice with its number of requests, then the slice rules (GAUC, LogLoss: the store)."""
    width = max([len("run"), *(len(str(name)) for name in table["name"])]) + 2
    head = "".join(f"{name.replace('_', ' '):>14}" for name in SLICES)
    lines = [f"{'AUC (requests)':<{width}}{head}"]
    for row in table.to_dict("records"):
        cells = []
        for name in SLICES:
            auc, n = row.get(slice_metric("auc", name), np.nan), row.get(slice_metric("requests", name), np.nan)
            cells.append(f"{_number(auc, 0).strip()} ({'-' if pd.isna(n) else f'{n:.0f}'})".rjust(14))
        lines.append(f"{row['name']!s:<{width}}{''.join(cells)}")
    recorded = table.dropna(subset=["cold_threshold"])
    lines.append(describe_slices(recorded.iloc[-1].to_dict() if len(recorded) else {}))
    return "\n".join(lines)


def format_slice_line(table: pd.DataFrame, full_depth: str, slice_name: str = "cold_items") -> str:
    """One line: a slice's AUC for the full-depth run, the best early-exit run and the best baseline, with counts."""
    auc, count = slice_metric("auc", slice_name), slice_metric("requests", slice_name)
    rows = table.set_index("run_id")
    if full_depth not in rows.index or pd.isna(rows.loc[full_depth, count]):
        return f"{slice_name.replace('_', ' ')}: not recorded"
    full = rows.loc[full_depth]
    parts = [f"full depth {_number(full[auc], 0).strip()}"]
    for label, kind in (("best early exit", "live"), ("best baseline", "baseline")):
        others = rows[(rows["kind"] == kind) & (rows.index != full_depth)].dropna(subset=[auc])
        if len(others):
            best = others.loc[others[auc].idxmax()]
            parts.append(f"{label} {best[auc]:.3f} ({best['name']})")
    threshold = full.get("cold_threshold", np.nan)
    rule = f"fewer than {threshold:.0f} training interactions, " if not pd.isna(threshold) else ""
    return (
        f"{slice_name.replace('_', ' ')} ({rule}{full[count]:.0f} of {full['requests']:.0f} requests): AUC "
        + ", ".join(parts)
    )


def _number(value: float, width: int) -> str:
    return f"{'-' if pd.isna(value) else f'{value:.3f}':>{width}}"


def write_plots(store: Store, table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Pareto curve of the LLM runs (AUC vs mean exit layer; baselines as horizontal lines) and exit histograms."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm = table[table["kind"] != "baseline"]
    figure = plots.pareto(llm)
    ax = figure.axes[0]
    for row in table[table["kind"] == "baseline"].itertuples():
        ax.axhline(row.auc, linestyle=":", color="gray")
        ax.annotate(f"{row.name} (no LLM)", (ax.get_xlim()[0], row.auc), fontsize=7, color="gray",
                    textcoords="offset points", xytext=(2, 2))  # fmt: skip
    paths = [out / "pareto.png"]
    figure.savefig(paths[0], dpi=120)
    for row in llm.itertuples():
        preds = store.predictions(row.run_id)
        layers = store.run(row.run_id)["exit_layers"]
        path = out / f"exits_{row.run_id}.png"
        plots.exit_histogram(preds["exit_layer"], layers).savefig(path, dpi=100)
        paths.append(path)
    return paths
