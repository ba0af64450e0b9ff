"""A notebook executed headless (nbclient saves the widget state), exported by nbconvert: widgets show their copy.

nbconvert renders a widget view whenever the notebook's saved state knows the widget, and offline that view is
an empty box (its renderer comes from a CDN). The static copy is a separate output, so it must appear too.
"""

from __future__ import annotations

import json
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from mhee_sdk.store import Store
from mhee_sdk.testing import synthetic_full_depth_run

nbconvert = pytest.importorskip("nbconvert", reason="nbconvert is in the dev extra")

STATIC_COPY = re.compile(r'<div class="mhee-static" id="(mhee-static-\w+)">(.*?)</div></div>', re.S)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def static_copies(page: str) -> dict[str, str]:
    """Static copies in an exported page, by element id (outside <script> blocks: shown, not data)."""
    shown = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)
    return dict(STATIC_COPY.findall(shown))


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec for this interpreter, found before any user-level python3."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mhee", "language": "python"}))
    folders = {"JUPYTER_PATH": "jupyter", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
               "IPYTHONDIR": "ipython"}  # fmt: skip
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_exported_html_shows_each_widgets_static_copy(kernel, tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    run_id = synthetic_full_depth_run(store, requests=60, layers=[1, 2, 3])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from mhee_sdk.store import Store\nfrom mhee_sdk.widgets import PolicyTuner, RunBrowser\n"
        f"store = Store.open({str(tmp_path / 'runs.duckdb')!r}, read_only=True)\n"
        f"tuner = PolicyTuner(store, {run_id!r})\ntuner"
    ), nbformat.v4.new_code_cell("RunBrowser(store)")])  # fmt: skip
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()

    assert "application/vnd.jupyter.widget-state+json" in nb.metadata["widgets"]  # so nbconvert picks the views
    for cell in nb.cells:  # each widget: its live view, then its copy in an output of its own
        view, copy = cell.outputs
        assert WIDGET_VIEW in view["data"] and WIDGET_VIEW not in copy["data"]
        assert copy["data"]["image/png"]
    page, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    copies = static_copies(page)
    assert len(copies) == 2
    for element_id, body in copies.items():
        assert '<img alt="plot" src="data:image/png;base64,' in body
        # the live view hides exactly this copy: its hidden <style> names the id (inside the saved state)
        assert f"#{element_id}" in page
    assert "AUC " in next(iter(copies.values()))  # the tuner's metrics, as text
    assert page.count('class="jupyter-widgets jp-OutputArea-output') == 2  # the views are still there
