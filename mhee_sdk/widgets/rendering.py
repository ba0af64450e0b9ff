"""Figures into widgets, and a static copy of a widget (HTML + PNG) for viewers without a kernel.

Figures go into an ``Output`` widget as PNG display data set on its ``outputs`` directly: that needs no
kernel (tests drive widgets in plain Python), no pyplot backend, and replaces the old plot in one step.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg, no pyplot)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def show_figures(output: widgets.Output, figures: Sequence[Figure]) -> None:
    """Make `output` show exactly these figures."""
    output.outputs = tuple(
        {
            "output_type": "display_data",
            "data": {
                "image/png": base64.b64encode(figure_png(figure)).decode("ascii"),
                "text/plain": f"<Figure: {figure.axes[0].get_title() if figure.axes else ''}>",
            },
            "metadata": {},
        }
        for figure in figures
    )


def output_pngs(output: widgets.Output) -> list[str]:
    """The base64 PNGs an `Output` shows, in order."""
    return [item["data"]["image/png"] for item in output.outputs if "image/png" in item.get("data", {})]


def escape(value: object) -> str:
    """Text made safe for HTML."""
    return html.escape(str(value))


class StaticFallback:
    """Mixin for a widget: its display bundle also carries HTML and a PNG of what it shows now.

    Live frontends (JupyterLab, Notebook 7, VS Code, Voila) pick the widget view; nbconvert and GitHub, which
    have no kernel and no saved widget state, fall back to the HTML (with the PNGs embedded) or the PNG.
    """

    def _static_parts(self) -> list[str | widgets.Output]:
        """HTML snippets and Outputs (their PNGs), in page order."""
        raise NotImplementedError

    def _repr_html_(self) -> str:
        parts = []
        for part in self._static_parts():
            if isinstance(part, widgets.Output):
                parts += [
                    f'<div><img alt="plot" src="data:image/png;base64,{png}"/></div>' for png in output_pngs(part)
                ]
            else:
                parts.append(f"<div>{part}</div>")
        return f'<div class="mhee-static">{"".join(parts)}</div>'

    def _repr_png_(self) -> bytes | None:
        pngs = [png for part in self._static_parts() if isinstance(part, widgets.Output) for png in output_pngs(part)]
        return base64.b64decode(pngs[0]) if pngs else None

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})  # type: ignore[misc]
        bundle["text/html"] = self._repr_html_()
        png = self._repr_png_()
        if png is not None:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle
