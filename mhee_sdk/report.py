"""Tables and plot files for runs in a store (what `mhee report` and `mhee demo` print and write)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mhee_sdk import plots
from mhee_sdk.store import Store

COLUMNS = ["name", "kind", "auc", "gauc", "logloss", "mean_exit_layer", "layer_savings", "speedup", "speedup_p25",
           "speedup_p75", "requests", "run_id"]  # fmt: skip


def runs_table(store: Store, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Finished runs (all, or the given ids in that order) with their headline metrics."""
    runs = store.runs()
    if run_ids:
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise ValueError(f"runs {missing} are not finished runs in {store.path}; see `mhee report` for the list")
        runs = runs.set_index("run_id").loc[list(run_ids)].reset_index()
    for column in COLUMNS:
        if column not in runs:
            runs[column] = np.nan
    return runs[COLUMNS].reset_index(drop=True)


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
