"""The tutorials run top to bottom with the tiny backbone, as CI runs them, in a copy of `tutorials/`.

Each notebook runs in a fresh kernel from this interpreter (a kernelspec in a temporary JUPYTER_PATH, so a
user-level `python3` kernel cannot shadow it) with ``MHEE_TUTORIAL_BACKBONE=tiny``. Its files land in the
copy's ``../build/tutorials``, inside ``tmp_path``; the committed notebooks stay without outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(path.name for path in TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
PLUGIN_COPY = "mhee-my-policy"  # the distribution 04 installs from a copy of the template, then uninstalls
# Patterns (regular expressions) each notebook's outputs must match: its main steps produced results, not
# merely raised nothing.
EXPECTED = {
    "01_quickstart.ipynb": [
        r"exit heads after layers \[1, 2, 3, 4, 5, 6\]",
        r"Ratings of the candidate by similar users:\n- ",
        r"valid AUC\s+best epoch",
        r"AUC\s+GAUC\s+LogLoss\s+mean exit\s+savings\s+speedup",
        r"calibrated\(budget=0.005\)\s+\d\.\d{3}",
        r"collab-logistic\s+\d\.\d{3}",
        r"best head: layer \d, AUC \d\.\d{3}; last layer 6: AUC \d\.\d{3}",  # why an early exit can score higher
        r"minus full depth: AUC [+-]\d\.\d{3} on 40 test requests, 90% bootstrap range [+-]\d\.\d{3} to [+-]\d",
        r"Exits of run max-prob\(threshold=0.75\)",
    ],
    "02_retrievers.ipynb": [
        r"all four answer the same 40 test requests: True",
        r"=== gcn users: \d+ retrieved, \d+ in the prompt",
        r"=== gcn history: \d+ retrieved, \d+ in the prompt",
        r"=== bm25: \d+ retrieved, \d+ in the prompt",
        r"=== vector: \d+ retrieved, \d+ in the prompt",
        r"first call ms/request",
        r"\d\.\d{3} to \d\.\d{3}",  # the bootstrap range
        r"vector\s+\d\.\d{3}\s+\d\.\d{3}\s+\d\.\d{3}\s+6\.0",  # the store's table: full depth
    ],
    "03_exit_policies.ipynb": [
        r"same exits",
        r"Tune an exit policy on run full depth",
        r"max-prob \{'threshold': 0.9\} \{'auc': \d",
        r"multi-head \{'ratio': 4.0, 'window': 2\} \{'auc': \d",
        r"test AUC drop",
        r"'thresholds': \{'1': ",
        r"tuned multi-head \(replay\)",
    ],
    "04_writing_a_plugin.ipynb": [
        r"DecayingThreshold keeps the contract",
        r"a row's decision depends on the other rows in the batch",
        r"the replay stops every request where the live run did: True",
        r"entry points: \{'my_policy': 'mhee_my_policy.plugin'\}",
        r"my-consecutive\s+exit_policy\s+my_policy",  # `mhee plugins` lists the installed copy
        r"my-consecutive\(count=2,thresh\S*\s+\d\.\d{3}",  # and a run used it
        r"still listed after uninstalling: False",
    ],
    "05_bring_your_own_data.ipynb": [
        r"clicks.csv: 4,000 interactions, \d+ users, \d+ items",
        r"cold \(fewer than 5 training interactions\), share of requests: valid: users \d",
        r"Error: clicks.csv has no column 'user' \(dataset_params.user",  # the one-line error, no traceback
        r"AUC\s+GAUC\s+LogLoss\s+mean exit\s+savings\s+speedup",
        r"cold items \(fewer than 5 training interactions, [1-9]\d* of 60 requests\): AUC full depth",
        r"User: a shopper from [A-Z]{2}\.\n(.+\n)*Candidate: .+\nWill the user like the candidate product\? Answer Yes",
        r"AUC \(requests\)\s+cold items\s+cold users\s+light users",
        r"light \d+-\d+, medium \d+-\d+, heavy \d+\+",
    ],
}
# Plots each notebook shows (PNG outputs, widget snapshots included).
MIN_PNGS = {"01_quickstart.ipynb": 2, "02_retrievers.ipynb": 1, "03_exit_policies.ipynb": 2,
            "05_bring_your_own_data.ipynb": 1}  # fmt: skip


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the kernels: this interpreter as `python3`, the tiny backbone, one thread, no user config."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "path" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mhee", "language": "python"}))
    env = {
        "JUPYTER_PATH": str(jupyter / "path"),  # searched first: this python3 wins over any other
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "IPYTHONDIR": str(jupyter / "ipython"),
        "MHEE_TUTORIAL_BACKBONE": "tiny",
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


def _texts(cell) -> list[str]:
    """Everything a code cell showed as text: streams, plain-text and HTML representations."""
    found = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            found.append(output["text"])
        else:
            data = output.get("data", {})
            found += [data[kind] for kind in ("text/plain", "text/html") if kind in data]
    return found


def _pngs(nb) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def _installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def test_every_tutorial_is_tested_and_committed_without_outputs():
    assert sorted(EXPECTED) == NOTEBOOKS, "add the new notebook's expected outputs to EXPECTED"
    for name in NOTEBOOKS:
        nb = nbformat.read(TUTORIALS / name, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name}: clear its outputs"
        assert 'os.environ.get("MHEE_TUTORIAL_BACKBONE", "smollm2-135m")' in code[0].source, name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs_top_to_bottom(name, kernel_env, tmp_path):
    copy = tmp_path / "tutorials"
    shutil.copytree(TUTORIALS, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    nb = nbformat.read(copy / name, as_version=4)
    # a first cell that reports which Python and which switch the kernel got
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import os, sys\nprint(sys.prefix, os.environ['MHEE_TUTORIAL_BACKBONE'], os.getcwd(), sep='\\n')"
    ))  # fmt: skip
    if name.startswith("04_"):
        assert not _installed(PLUGIN_COPY), f"{PLUGIN_COPY} is installed already: `pip uninstall {PLUGIN_COPY}`"
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(copy)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    finally:
        nbformat.write(nb, copy / name)  # the executed copy, for a look after a failure
        if _installed(PLUGIN_COPY):  # 04 failed between installing and uninstalling: leave the venv clean
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", PLUGIN_COPY], check=False)

    assert _texts(nb.cells[0])[0].split("\n")[:3] == [sys.prefix, "tiny", str(copy)]
    texts = [text for cell in nb.cells for text in _texts(cell)]
    missing = [pattern for pattern in EXPECTED[name] if not any(re.search(pattern, text) for text in texts)]
    assert not missing, f"{name} did not show {missing}; executed copy: {copy / name}"
    assert not any("skipped plugin" in text for text in texts)  # a broken plugin would quietly change what runs
    assert _pngs(nb) >= MIN_PNGS.get(name, 0)
    if name.startswith("03_"):  # every policy replayed stops each request where its live run did
        assert not any("same exits" in text and "False" in text for text in texts)
    assert not _installed(PLUGIN_COPY)
    assert (tmp_path / "build" / "tutorials").is_dir()  # stores and plots go next to the copy, not the repo
    if name.startswith("01_"):  # exported to HTML (the widget state saved), the ExitExplorer still shows offline
        from nbconvert import HTMLExporter

        page, _ = HTMLExporter().from_notebook_node(nb)
        shown = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)  # what a reader sees, not embedded data
        statics = re.findall(r'<div class="mhee-static" id="mhee-static-\w+">(.*?)</div></div>', shown, flags=re.S)
        assert "application/vnd.jupyter.widget-state+json" in nb.metadata.get("widgets", {})
        assert any("Exits of run max-prob" in static and '<img alt="plot" src="data:image/png;base64,' in static
                   for static in statics), f"no static ExitExplorer in the HTML export of {copy / name}"  # fmt: skip
