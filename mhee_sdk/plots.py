"""Matplotlib views: the AUC-vs-depth Pareto curve, the exit-layer histogram, one request's per-layer trace.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so it works headless, in
scripts and inside widgets alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def pareto(runs: pd.DataFrame, x: str = "mean_exit_layer", y: str = "auc", label: str = "name",
           highlight: tuple[float, float] | None = None, ax=None) -> Figure:  # fmt: skip
    """AUC (y) against mean exit layer (x) per run; the upper-left frontier is drawn as a line.

    `highlight` marks one extra point (e.g. the setting a tuner is on).
    """
    figure, ax = _axes(ax, (6, 4))
    frame = runs.dropna(subset=[x, y]).sort_values(x)
    ax.scatter(frame[x], frame[y], color="tab:blue", zorder=3)
    for n, (_, row) in enumerate(frame.iterrows()):  # alternate above/below so neighbours' labels don't collide
        ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points",
                    xytext=(4, 5 if n % 2 == 0 else -11), fontsize=8)  # fmt: skip
    best, frontier = -np.inf, []
    for _, row in frame.iterrows():  # cheapest first: a point is on the frontier if it beats all cheaper ones
        if row[y] > best:
            best = row[y]
            frontier.append((row[x], row[y]))
    if len(frontier) > 1:
        ax.plot(*zip(*frontier, strict=True), color="tab:blue", alpha=0.5, label="Pareto frontier")
    if highlight is not None:
        ax.scatter([highlight[0]], [highlight[1]], color="tab:red", s=80, zorder=4, label="current")
    ax.set_xlabel({"mean_exit_layer": "mean exit layer (lower is faster)"}.get(x, x))
    ax.set_ylabel(y.upper() if y in {"auc", "gauc"} else y)
    ax.set_title("Quality vs depth")
    ax.grid(alpha=0.3)
    if len(frontier) > 1 or highlight is not None:
        ax.legend(loc="lower right", fontsize=8)
    return figure


def exit_histogram(exit_layers: Sequence[int], layers: Sequence[int], ax=None) -> Figure:
    """Number of requests that exited at each exit layer."""
    figure, ax = _axes(ax, (6, 3))
    counts = pd.Series(np.asarray(exit_layers)).value_counts().reindex(list(layers), fill_value=0)
    ax.bar([str(layer) for layer in layers], counts.to_numpy(), color="tab:green")
    ax.set_xlabel("exit layer")
    ax.set_ylabel("requests")
    ax.set_title(f"Where {len(exit_layers)} requests exited (mean layer {np.mean(exit_layers):.1f})")
    return figure


def request_trace(layer_probs: pd.DataFrame, exit_layer: int | None = None,
                  thresholds: Sequence[float] = (), ax=None) -> Figure:  # fmt: skip
    """P(like) per exit layer for one request (one line per head); the exit layer and policy thresholds marked.

    layer_probs: columns ``layer, prob`` and optionally ``head``.
    """
    figure, ax = _axes(ax, (6, 3))
    heads = layer_probs["head"].unique() if "head" in layer_probs else [None]
    for head in heads:
        rows = layer_probs if head is None else layer_probs[layer_probs["head"] == head]
        ax.plot(rows["layer"], rows["prob"], marker="o", label=head or "P(like)")
    for threshold in thresholds:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.axhline(0.5, color="black", linewidth=0.5)
    if exit_layer is not None:
        ax.axvline(exit_layer, color="tab:red", linewidth=1.5, label=f"exit at layer {exit_layer}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("P(like)")
    ax.legend(loc="best", fontsize=8)
    return figure


def _axes(ax, size: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    figure = Figure(figsize=size, layout="tight")
    return figure, figure.add_subplot()
