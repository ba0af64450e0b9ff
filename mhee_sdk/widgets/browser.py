"""RunBrowser: the store's runs as a table to filter and sort; pick two or more to compare side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

from mhee_sdk import plots
from mhee_sdk.data.split import SLICES
from mhee_sdk.metrics import SLICE_METRICS, slice_metric
from mhee_sdk.store import Store
from mhee_sdk.widgets.rendering import StaticFallback, escape, show_figures

COLUMNS = ["name", "kind", "auc", "gauc", "logloss", "mean_exit_layer", "layer_savings", "speedup", "requests",
           "created", "run_id"]  # fmt: skip
METRIC_ROWS = ["auc", "gauc", "logloss", "accuracy", "mean_exit_layer", "layer_savings", "speedup",
               "requests_per_s", "requests"]  # fmt: skip
# quality on the cold-start and activity slices (mhee_sdk.data.split), compared side by side too
SLICE_ROWS = [slice_metric(metric, name) for name in SLICES for metric in SLICE_METRICS]
# label -> (column, ascending)
SORTS: dict[str, tuple[str, bool]] = {
    "newest first": ("created", False),
    "oldest first": ("created", True),
    "AUC, best first": ("auc", False),
    "LogLoss, best first": ("logloss", True),
    "mean exit layer, shallowest first": ("mean_exit_layer", True),
    "speedup, fastest first": ("speedup", False),
    "name": ("name", True),
}


class RunBrowser(StaticFallback, widgets.VBox):
    """Finished runs of a store: filter, sort, and compare a selection (metrics, slices, exit histograms, Pareto)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.filter_text = widgets.Text(placeholder="name, kind or run id", description="filter")
        self.sort_select = widgets.Dropdown(options=list(SORTS), value="newest first", description="sort")
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        self.table = widgets.HTML()
        self.run_select = widgets.SelectMultiple(description="compare", rows=8, layout=widgets.Layout(width="40em"))
        self.comparison = widgets.HTML()
        self.figures = widgets.Output()
        self.heading = widgets.HTML(f"<h3>Runs in <code>{escape(store.path)}</code></h3>")
        super().__init__(children=[
            self.heading, widgets.HBox([self.filter_text, self.sort_select, self.refresh_button]), self.table,
            self.run_select, self.comparison, self.figures,
        ])  # fmt: skip
        self.add_class("mhee-run-browser")
        self.runs = pd.DataFrame()
        self.filter_text.observe(lambda _: self._show_table(), "value")
        self.sort_select.observe(lambda _: self._show_table(), "value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self._listing = False  # True while the options are replaced: the selection flickers, don't redraw
        self.run_select.observe(lambda _: self._listing or self._show_comparison(), "value")
        self.refresh()

    def refresh(self) -> None:
        """Re-read the store (e.g. after a PolicyTuner saved a run)."""
        runs = self.store.runs()
        for column in set(COLUMNS + METRIC_ROWS + SLICE_ROWS) - set(runs.columns):
            runs[column] = float("nan")
        self.runs = runs
        self._show_table()

    @property
    def visible_runs(self) -> pd.DataFrame:
        """The runs the filter keeps, in the chosen order."""
        query = self.filter_text.value.strip().lower()
        runs = self.runs
        if query:
            text = runs["name"].astype(str) + " " + runs["kind"].astype(str) + " " + runs["run_id"].astype(str)
            runs = runs[text.str.lower().str.contains(query, regex=False)]
        column, ascending = SORTS[self.sort_select.value]
        return runs.sort_values(column, ascending=ascending, na_position="last").reset_index(drop=True)

    def compare(self, run_ids: Sequence[str]) -> None:
        """Select these runs (they must be visible) for comparison."""
        self.run_select.value = tuple(run_ids)

    def _show_table(self) -> None:
        runs = self.visible_runs
        shown = runs[COLUMNS].assign(created=pd.to_datetime(runs["created"]).dt.strftime("%Y-%m-%d %H:%M:%S"))
        self.table.value = shown.to_html(index=False, border=0, na_rep="-", float_format="{:.4g}".format)
        chosen = tuple(run for run in self.run_select.value if run in set(runs["run_id"]))
        self._listing = True
        try:
            self.run_select.options = [(f"{r.name} · {r.kind} · {r.run_id}", r.run_id) for r in runs.itertuples()]
            self.run_select.value = chosen
        finally:
            self._listing = False
        self._show_comparison()

    def _show_comparison(self) -> None:
        chosen = self.runs.set_index("run_id").loc[list(self.run_select.value)].reset_index()
        if len(chosen) < 2:
            self.comparison.value = "<i>pick two or more runs above (ctrl- or shift-click) to compare them</i>"
            show_figures(self.figures, [plots.pareto(self.visible_runs)])
            return
        headers = [f"{name} ({run_id})" for name, run_id in zip(chosen["name"], chosen["run_id"], strict=True)]
        metrics = chosen[METRIC_ROWS + SLICE_ROWS].T.set_axis(headers, axis=1).dropna(how="all")
        self.comparison.value = "<b>side by side</b>" + metrics.to_html(border=0, na_rep="-",
                                                                         float_format="{:.4g}".format)  # fmt: skip
        show_figures(self.figures, [plots.pareto(chosen), self._histograms(chosen)])

    def _histograms(self, runs: pd.DataFrame) -> Figure:
        width = min(len(runs), 3)
        figure = Figure(figsize=(4.2 * width, 2.8 * math.ceil(len(runs) / width)), layout="tight")
        axes = figure.subplots(math.ceil(len(runs) / width), width, squeeze=False).ravel()
        for ax, row in zip(axes, runs.itertuples(), strict=False):
            layers = self.store.run(row.run_id)["exit_layers"]
            if not layers:  # a baseline: no LLM, no exits
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{row.name}\n(no exit layers)", ha="center", va="center", fontsize=9)
                continue
            exits = self.store.predictions(row.run_id)["exit_layer"]
            plots.exit_histogram(exits, layers, ax=ax)
            ax.set_title(f"{row.name}\nmean exit layer {exits.mean():.2f}", fontsize=9)
        for ax in axes[len(runs) :]:
            ax.set_axis_off()
        return figure

    def _static_parts(self) -> list[str | widgets.Output]:
        return [self.heading.value, self.table.value, self.comparison.value, self.figures]
