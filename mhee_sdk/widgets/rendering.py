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
    """Mixin for a widget: it shows as the live view plus a static copy (HTML with its PNGs) that the view hides.

    The copy needs its own output. In one bundle with the widget view, nbconvert's HTML exporter picks the
    view whenever the notebook saved widget state (nbclient and JupyterLab save it), and offline, without the
    widget manager from a CDN, that view stays empty. So ``display(widget)`` writes two outputs: the view,
    then the copy. The view carries a hidden ``<style>`` that hides exactly its own copy: where widgets
    render (JupyterLab, Notebook 7, VS Code, Voila, nbconvert online) the view shows alone; where they do
    not (nbconvert offline, GitHub) the copy does.
    """

    def __init__(self, *args: Any, children: Sequence[widgets.Widget] = (), **kwargs: Any) -> None:
        self._copy_hider = widgets.HTML(layout=widgets.Layout(display="none"))  # a <style> applies while hidden
        super().__init__(*args, children=[*children, self._copy_hider], **kwargs)  # type: ignore[call-arg]
        self._copy_hider.value = (
            f"<style>#{self._static_id}, .jp-OutputArea-child:has(#{self._static_id}) {{display: none}}</style>"
        )

    @property
    def _static_id(self) -> str:
        return f"mhee-static-{self.model_id}"  # type: ignore[attr-defined]

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
        return f'<div class="mhee-static" id="{self._static_id}">{"".join(parts)}</div>'

    def _repr_png_(self) -> bytes | None:
        pngs = [png for part in self._static_parts() if isinstance(part, widgets.Output) for png in output_pngs(part)]
        return base64.b64decode(pngs[0]) if pngs else None

    def _static_bundle(self) -> dict[str, Any]:
        bundle = {"text/plain": f"static copy of {type(self).__name__}", "text/html": self._repr_html_()}
        png = self._repr_png_()
        if png is not None:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """View and copy in one bundle, for callers that take one; IPython's display uses `_ipython_display_`."""
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})  # type: ignore[misc]
        return {**bundle, **self._static_bundle(), "text/plain": bundle.get("text/plain", "")}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        view = dict(super()._repr_mimebundle_() or {})  # type: ignore[misc]
        view["text/plain"] = f"{type(self).__name__} (live widget; its static copy follows)"
        display(view, raw=True)
        display(self._static_bundle(), raw=True)
