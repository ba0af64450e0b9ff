"""plugins/mhee-plugin-template: its own tests pass, its entry point loads, and a broken copy fails the suite."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mhee_sdk.registry import Registry
from mhee_sdk.testing import ContractError, check_exit_policy

TEMPLATE = Path(__file__).resolve().parents[1] / "plugins" / "mhee-plugin-template"
NOT_INSTALLED = "mhee-plugin-template is not installed; run `pip install -e plugins/mhee-plugin-template` (make setup)"


def test_template_tests_pass():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MHEE_PLUGINS": "template"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=TEMPLATE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_template_is_registered_from_its_entry_point():
    registry = Registry()  # built-ins and every installed entry point, as `mhee plugins` loads them
    assert [f.error for f in registry.failures if f.name == "template"] == []
    plugins = {p.name: p for p in registry.plugins}
    assert "template" in plugins, NOT_INSTALLED
    assert plugins["template"].source == "entry point"
    assert plugins["template"].version == "0.1.0"
    assert plugins["template"].hooks == ("register_exit_policies",)
    entry, _ = registry.get("exit_policy", "consecutive-confident")
    assert entry.plugin == "template"
    assert entry.description == "Exit when the last N heads were all >= T confident"
    policy = registry.create("exit_policy", "consecutive-confident", count=3)
    assert (policy.name, policy.count, policy.threshold) == ("consecutive-confident", 3, 0.8)


def broken_copy(tmp_path: Path, new_decide_body: str) -> ModuleType:
    """Copy the template's policy module into tmp_path with `decide`'s return statement replaced."""
    source = (TEMPLATE / "mhee_plugin_template" / "policy.py").read_text()
    original = "        return (confidence >= self.threshold).all(axis=1)\n"
    assert original in source, "the template's decide() changed; update this test's patch"
    package = tmp_path / "broken_template"
    shutil.copytree(TEMPLATE / "mhee_plugin_template", package)
    (package / "policy.py").write_text(source.replace(original, new_decide_body))
    name = f"broken_template_{tmp_path.name}"
    spec = importlib.util.spec_from_file_location(name, package / "policy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while building the class
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize(
    ("body", "problem", "fix"),
    [
        (
            # a Python list, one entry short
            "        return list((confidence >= self.threshold).all(axis=1))[:-1]\n",
            "decide() returned shape (63,) dtype bool for 64 rows",
            "return a numpy bool array with one entry per row",
        ),
        (
            # confident "relative to the batch": the answer changes when other rows leave
            "        return confidence.min(axis=1) >= np.median(confidence.min(axis=1))\n",
            "a row's decision depends on the other rows in the batch",
            "decide each row from its own probs only",
        ),
        (
            # probabilities instead of decisions
            "        return confidence.min(axis=1)\n",
            "dtype float64",
            "return a numpy bool array",
        ),
    ],
    ids=["wrong-length-list", "batch-dependent", "floats"],
)
def test_a_broken_copy_fails_the_conformance_suite(tmp_path, body, problem, fix):
    module = broken_copy(tmp_path, body)
    with pytest.raises(ContractError) as caught:
        check_exit_policy(module.ConsecutiveConfident())
    message = str(caught.value)
    assert message.startswith("exit policy 'consecutive-confident': ")
    assert problem in message
    assert fix in message.split("Fix:", 1)[1]


def test_the_unbroken_copy_passes(tmp_path):
    module = broken_copy(tmp_path, "        return (confidence >= self.threshold).all(axis=1)\n")
    check_exit_policy(module.ConsecutiveConfident(count=3, threshold=0.7))
