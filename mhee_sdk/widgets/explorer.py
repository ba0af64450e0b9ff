"""ExitExplorer: where a run's requests exited, and for one request its prompt, evidence and per-layer P(like)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd

from mhee_sdk import plots
from mhee_sdk.interfaces import ThresholdPolicy
from mhee_sdk.registry import Registry, get_registry
from mhee_sdk.store import Store
from mhee_sdk.widgets.rendering import StaticFallback, escape, show_figures

MAX_OPTIONS = 500  # a Dropdown with thousands of entries is slow in every frontend; the search narrows it


def confidence_thresholds(
    policy: str, params: dict[str, Any], layers: Sequence[int], registry: Registry | None = None
) -> tuple[list[float], dict[int, float]]:
    """The confidence levels at which a run's policy exits, as the policy states them (``ThresholdPolicy``).

    Returns ``(global levels, {})`` when one level holds at every layer (drawn as lines at the level and at
    1 - level), else ``([], {layer: level})``; ``([], {})`` for policies with no such level (or unknown ones).
    """
    registry = registry or get_registry()
    if not policy or policy not in registry.names("exit_policy"):
        return [], {}
    built = registry.create("exit_policy", policy, **params)
    if not isinstance(built, ThresholdPolicy):
        return [], {}
    levels = built.confidence_levels(layers)
    values = set(levels.values())
    if len(values) == 1 and set(levels) == {int(layer) for layer in layers}:
        level = values.pop()
        return sorted({level, 1.0 - level}), {}
    return [], levels


class ExitExplorer(StaticFallback, widgets.VBox):
    """A run's exit-layer histogram and a request picker showing prompt, retrieved items and head outputs."""

    def __init__(self, store: Store, run_id: str, registry: Registry | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.record = store.run(run_id)
        self.predictions = store.predictions(run_id).set_index("request_id", drop=False)
        if self.predictions.empty:
            raise ValueError(f"run {run_id!r} has no predictions; pick a finished run from store.runs()")
        # a replay run (saved by PolicyTuner) stores only predictions: prompts and head outputs are its parent's
        self.evidence_run = run_id
        if store.requests(run_id).empty and self.record.get("parent_run"):
            self.evidence_run = self.record["parent_run"]
        self.requests = store.requests(self.evidence_run).set_index("request_id")
        policy, params = self.record["config"].get("policy", ""), self.record["config"].get("policy_params", {})
        run_layers = self.record["exit_layers"] or sorted(int(x) for x in self.predictions["exit_layer"].unique())
        self.thresholds, self.layer_thresholds = confidence_thresholds(policy, params, run_layers, registry)
        self.histogram = widgets.Output()
        self.search = widgets.Text(placeholder="request id, user or item", description="search",
                                   continuous_update=True)  # fmt: skip
        self.request_select = widgets.Dropdown(description="request", layout=widgets.Layout(width="32em"))
        self.summary = widgets.HTML()
        self.prompt = widgets.HTML()
        self.retrieved = widgets.HTML()
        self.trace = widgets.Output(layout=widgets.Layout(width="620px"))  # the 6 x 3 in trace at 100 dpi
        self.heading = widgets.HTML(
            f"<h3>Exits of run {escape(self.record['name'])} <code>{escape(run_id)}</code></h3>"
        )
        # the text column takes the room left beside the plot, and wraps below it in a narrow notebook
        text = widgets.VBox([self.prompt, self.retrieved], layout=widgets.Layout(flex="1 1 24em", min_width="24em"))
        super().__init__(children=[
            self.heading, self.histogram, widgets.HBox([self.search, self.request_select]), self.summary,
            widgets.HBox([self.trace, text], layout=widgets.Layout(flex_flow="row wrap")),
        ])  # fmt: skip
        self.add_class("mhee-exit-explorer")
        self.layers = run_layers
        show_figures(self.histogram, [plots.exit_histogram(self.predictions["exit_layer"], self.layers)])
        self.search.observe(lambda _: self._filter(), "value")
        self.request_select.observe(lambda change: self.show(change["new"]), "value")
        self._filter()

    def _filter(self) -> None:
        query = self.search.value.strip()
        preds = self.predictions
        keys = preds["request_id"].astype(str) + " " + preds["user"].astype(str) + " " + preds["item"].astype(str)
        matches = preds[keys.str.contains(query, regex=False)] if query else preds
        options = [
            (f"{row.request_id} · user {row.user} · item {row.item} · exit {row.exit_layer}", int(row.request_id))
            for row in matches.head(MAX_OPTIONS).itertuples()
        ]
        previous = self.request_select.value
        self.request_select.options = options  # the value observer shows whatever ends up selected
        values = [value for _, value in options]
        target = previous if previous in values else (values[0] if values else None)
        if self.request_select.value != target:
            self.request_select.value = target

    def show(self, request_id: int | None) -> None:
        """Show one request (None clears the view)."""
        if request_id is None:
            self.summary.value = "<i>no request matches the search</i>"
            self.prompt.value = self.retrieved.value = ""
            self.trace.outputs = ()
            return
        pred = self.predictions.loc[request_id]
        self.summary.value = (
            f"<b>request {pred['request_id']}</b> · user {pred['user']} · item {pred['item']} · "
            f"label {pred['label']} · P(like) {pred['prob']:.3f} · <b>exited at layer {pred['exit_layer']}</b>"
        )
        if request_id in self.requests.index:
            row = self.requests.loc[request_id]
            self.prompt.value = f"<b>prompt</b><pre style='white-space: pre-wrap'>{escape(row['prompt'])}</pre>"
            found = pd.DataFrame(json.loads(row["retrieved"] or "[]"))
            table = found.to_html(index=False, border=0, float_format="{:.3g}".format) if len(found) else "(none)"
            self.retrieved.value = f"<b>retrieved items</b>{table}"
        else:
            self.prompt.value = f"<i>run {escape(self.evidence_run)} stored no prompt for this request</i>"
            self.retrieved.value = ""
        outputs = self.store.layer_outputs(self.evidence_run, request_id)
        figure = plots.request_trace(outputs, int(pred["exit_layer"]), self.thresholds)
        if self.layers:  # every exit layer on the axis, so a shallow exit looks shallow
            figure.axes[0].set_xticks(self.layers)
            figure.axes[0].set_xlim(min(self.layers) - 0.5, max(self.layers) + 0.5)
        if self.layer_thresholds:
            ax = figure.axes[0]
            layers, levels = list(self.layer_thresholds), np.array(list(self.layer_thresholds.values()))
            ax.scatter(layers + layers, np.r_[levels, 1 - levels], marker="_", s=300, color="gray",
                       label="per-layer thresholds")  # fmt: skip
            ax.legend(loc="best", fontsize=8)
        show_figures(self.trace, [figure])

    def _static_parts(self) -> list[str | widgets.Output]:
        return [self.heading.value, self.histogram, self.summary.value, self.trace]
