"""The examples in docs/plugins.md run as written.

A ```python block is a **complete program** when it contains the line ``if __name__ == "__main__":``;
every other block is a fragment (a signature, a few lines of a notebook) and is only compiled. Each
program runs in its own interpreter (``sys.executable``) in an empty temporary directory, with the
user's environment (``MHEE_HOME`` unchanged: the real MovieLens files are there), and must exit with
status 0 within ``TIMEOUT_S``. Every hook section (``## register_*``) must hold exactly one program,
so a section cannot lose its runnable example unnoticed.

Most of a program's time is importing torch, transformers and scikit-learn, one core's work, so the
programs run side by side, as many at a time as this process may use CPUs, each with one torch thread
(``OMP_NUM_THREADS=1``): on tensors this small, more threads only wait on each other, and on a busy
machine that doubled the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = ("datasets", "retrievers", "backbones", "exit_heads", "exit_policies", "baselines")
MAIN = 'if __name__ == "__main__":'
TIMEOUT_S = 300  # each program takes seconds; the margin is for a busy machine

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SECTION = re.compile(r"^## (\S+)", re.MULTILINE)


def python_blocks(text: str) -> list[tuple[str, str]]:
    """Every ```python block of a markdown page, with the ``## `` section it sits in ("" before the first)."""
    starts = [(match.start(), match.group(1)) for match in _SECTION.finditer(text)]
    blocks = []
    for match in _BLOCK.finditer(text):
        section = next((name for start, name in reversed(starts) if start < match.start()), "")
        blocks.append((section, match.group(1)))
    return blocks


BLOCKS = python_blocks(PAGE.read_text())
PROGRAMS = [(section, code) for section, code in BLOCKS if MAIN in code]


def test_every_hook_section_has_one_program():
    per_section = {f"register_{hook}": 0 for hook in HOOKS}
    for section, _ in PROGRAMS:
        per_section[section] = per_section.get(section, 0) + 1
    assert per_section == {f"register_{hook}": 1 for hook in HOOKS}


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_every_block_compiles(number):
    section, code = BLOCKS[number]
    compile(code, f"{PAGE.name} block {number} ({section or 'intro'})", "exec")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> list[subprocess.CompletedProcess | subprocess.TimeoutExpired]:
    """Every program's outcome, in PROGRAMS order."""

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(program: tuple[str, str]) -> subprocess.CompletedProcess | subprocess.TimeoutExpired:
        section, code = program
        folder = tmp_path_factory.mktemp(section or "intro")
        (folder / "example.py").write_text(code)
        try:
            return subprocess.run(
                [sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            return err

    workers = max(1, min(len(PROGRAMS), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, PROGRAMS))


@pytest.mark.parametrize("number", range(len(PROGRAMS)), ids=[section for section, _ in PROGRAMS])
def test_program_runs(number, finished):
    section, outcome = PROGRAMS[number][0], finished[number]
    if isinstance(outcome, subprocess.TimeoutExpired):
        pytest.fail(f"the {section} example in {PAGE.name} did not finish within {TIMEOUT_S} s")
    assert outcome.returncode == 0, f"the {section} example in {PAGE.name} failed:\n{outcome.stdout}\n{outcome.stderr}"
