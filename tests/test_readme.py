"""The README's notebook snippet runs as written (tiny backbone), with its widget built on the stored run."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_notebook_snippet_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(from mhee_sdk import .*?)```", README.read_text(), re.S).group(1)
    assert 'backbone="tiny"' in code  # the quick variant is the one that runs; the real model is commented
    monkeypatch.chdir(tmp_path)  # its store file lands here
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    table = capsys.readouterr().out
    assert re.search(r"full depth .* 1\.00x", table) and "max-prob" in table
    assert (tmp_path / "runs.duckdb").is_file()
    full, fast = namespace["full"], namespace["fast"]
    assert len(full.predictions) == len(fast.predictions) == 40
    assert fast.metrics["mean_exit_layer"] <= full.metrics["mean_exit_layer"] == 6
    assert "speedup" in fast.metrics  # measured beside full depth, batch by batch
