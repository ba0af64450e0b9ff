"""Tutorial 03 served by Voila and driven in headless Chromium: its PolicyTuner renders and follows a slider.

Voila runs a copy of the notebook top to bottom with the tiny backbone (``MHEE_TUTORIAL_BACKBONE=tiny``, as
the tutorial tests do), so the page shows the widget state the notebook left: the tuner on `multi-head`.
The test switches it back to `max-prob` in the page and drags the threshold. The copy ends with two more
cells, an ExitExplorer and a RunBrowser on the tutorial's store, which must render too; each widget's
static copy (for pages without widgets) must stay hidden.

``MHEE_SCREENSHOTS=docs/images`` also saves a screenshot of each widget there (small palette PNGs: they are
committed and shown by README.md and docs/widgets.md).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

CHROMIUM = Path("/usr/bin/chromium")
TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOK = "03_exit_policies.ipynb"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "build" / "voila_policy_tuner.png"
# appended to the served copy: the other two widgets, on the runs the tutorial stored
MORE_WIDGETS = """\
from mhee_sdk.widgets import ExitExplorer, RunBrowser

display(ExitExplorer(store, runs["max-prob"]))
browser = RunBrowser(store)
browser.compare([runs["full depth"], runs["max-prob"], runs["patience"]])
browser"""
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("MHEE_REQUIRE_BROWSER"),
    reason="needs /usr/bin/chromium (apt-get install -y chromium); CI sets MHEE_REQUIRE_BROWSER=1 to fail instead",
)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"voila exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"voila did not listen on 127.0.0.1:{port} within {timeout} s:\n{log.read_text()[-3000:]}")


def save_screenshot(locator, name: str) -> None:
    """A screenshot of one element into $MHEE_SCREENSHOTS (relative to the repository), as a 256-colour PNG."""
    from PIL import Image, ImageChops

    folder = ROOT / os.environ["MHEE_SCREENSHOTS"]
    folder.mkdir(parents=True, exist_ok=True)
    locator.scroll_into_view_if_needed()
    locator.page.wait_for_timeout(1_000)  # the page paints what scrolled into view
    image = Image.open(io.BytesIO(locator.screenshot(animations="disabled"))).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()  # trim the white margin
    if box:
        image = image.crop((0, 0, min(image.width, box[2] + 8), min(image.height, box[3] + 8)))
    image.quantize(colors=256).save(folder / name, optimize=True)  # UI colours fit a palette: a third the size


@pytest.fixture
def voila_url(tmp_path):
    """Voila serving the notebook on 127.0.0.1 with a kernel from this interpreter and no user Jupyter config."""
    kernel = tmp_path / "jupyter-path" / "kernels" / "python3"  # JUPYTER_PATH is searched first: this python3 wins
    kernel.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mhee", "language": "python"}))
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter-path"),
           "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython"),
           "OMP_NUM_THREADS": "1", "MHEE_TUTORIAL_BACKBONE": "tiny"}  # fmt: skip
    copy = tmp_path / "tutorials"  # the notebook writes to ../build: keep that inside tmp_path
    shutil.copytree(TUTORIALS, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    notebook = nbformat.read(copy / NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(MORE_WIDGETS))
    nbformat.write(notebook, copy / NOTEBOOK)
    port = _free_port()
    log = tmp_path / "voila.log"
    command = [sys.executable, "-m", "voila", str(copy / NOTEBOOK), "--no-browser", f"--port={port}",
               "--Voila.ip=127.0.0.1", "--VoilaConfiguration.show_tracebacks=True"]  # fmt: skip
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=copy)
    try:
        _wait_for_port(port, server, log)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def test_tutorial_03_in_voila_its_policy_tuner_follows_a_slider(voila_url):
    if not CHROMIUM.exists():
        pytest.fail("MHEE_REQUIRE_BROWSER is set but /usr/bin/chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    url, log = voila_url
    blocked: list[str] = []

    def local_only(route) -> None:  # the page must work offline: anything off this machine is refused
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.route("**/*", local_only)
            page.goto(url, timeout=300_000)  # Voila answers once the whole notebook has run
            auc = page.locator(".mhee-metric-auc")
            mean_exit = page.locator(".mhee-metric-mean_exit_layer")
            expect(auc).to_contain_text(re.compile(r"AUC \d\.\d{4}"), timeout=60_000)
            page.locator(".mhee-policy-select select").select_option("max-prob")  # the notebook left multi-head
            expect(page.locator(".mhee-knob-threshold .noUi-handle")).to_be_visible(timeout=15_000)
            page.wait_for_timeout(2_000)  # let the switch's metrics and plot arrive before reading "before"
            for static in page.locator(".mhee-static").all():  # live views hide their static copies
                expect(static).to_be_hidden()
            before = (auc.inner_text(), mean_exit.inner_text())
            assert re.fullmatch(r"mean exit layer \d\.\d\d", before[1])
            pareto = page.locator(".mhee-policy-tuner .widget-output img")
            plotted = pareto.get_attribute("src")
            handle = page.locator(".mhee-knob-threshold .noUi-handle")
            page.locator(".mhee-policy-tuner").scroll_into_view_if_needed()  # mouse coordinates are the viewport's
            start = handle.bounding_box()
            track = page.locator(".mhee-knob-threshold .noUi-target").bounding_box()
            page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
            page.mouse.down()  # drag the threshold to its left end, 0.50: every request exits at the first layer
            page.mouse.move(track["x"] - 20, start["y"] + start["height"] / 2, steps=8)
            page.mouse.up()
            expect(page.locator(".mhee-knob-threshold .widget-readout")).to_have_text("0.50")
            expect(mean_exit).to_have_text("mean exit layer 1.00", timeout=15_000)
            after = (auc.inner_text(), mean_exit.inner_text())
            assert after != before
            expect(pareto).not_to_have_attribute("src", plotted, timeout=15_000)  # redrawn at the new point
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            explorer, browser_view = page.locator(".mhee-exit-explorer"), page.locator(".mhee-run-browser")
            expect(explorer.locator(".widget-output img").first).to_be_visible(timeout=30_000)  # histogram, trace
            expect(explorer).to_contain_text("Exits of run max-prob")
            expect(browser_view.locator(".widget-output img").first).to_be_visible(timeout=30_000)
            expect(browser_view).to_contain_text("full depth")
            if os.environ.get("MHEE_SCREENSHOTS"):
                # a tall viewport: the page leaves cells outside it unpainted, which a tall element would show
                page.set_viewport_size({"width": 1200, "height": 2400})
                page.locator(".mhee-policy-tuner").scroll_into_view_if_needed()
                at_left = pareto.get_attribute("src")
                handle.hover()  # move the threshold back to the middle of the track for the picture
                box = handle.bounding_box()
                track = page.locator(".mhee-knob-threshold .noUi-target").bounding_box()
                page.mouse.down()
                page.mouse.move(track["x"] + 0.5 * track["width"], box["y"] + box["height"] / 2, steps=8)
                page.mouse.up()
                expect(pareto).not_to_have_attribute("src", at_left, timeout=15_000)  # redrawn at the new point
                save_screenshot(page.locator(".mhee-policy-tuner"), "policy_tuner.png")
                save_screenshot(explorer, "exit_explorer.png")
                save_screenshot(browser_view, "run_browser.png")
        except Exception:
            print(f"voila log:\n{log.read_text()[-5000:]}\nrefused off-machine requests: {blocked}")
            raise
        finally:
            browser.close()
