from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mhee_sdk import hookimpl
from mhee_sdk.registry import (
    DuplicateNameError,
    PluginError,
    PluginWarning,
    Registry,
    UnknownNameError,
)

BUILTINS = {
    "dataset": {"interactions", "movielens-100k"},
    "retriever": {"none", "recent", "random"},
    "backbone": {"smollm2-135m", "tiny", "hf:<spec>"},
    "exit_head": {"linear", "mlp", "verbalizer"},
    "exit_policy": {"never", "fixed-layer", "max-prob", "entropy", "margin", "patience", "multi-head", "calibrated"},
}


GOOD = """
from mhee_sdk import hookimpl

class Always:
    name = "always"
    def decide(self, layer, probs):
        return probs[:, -1] >= 0.0

@hookimpl
def register_exit_policies(register):
    register("always", Always)
"""


def test_every_builtin_is_registered(registry):
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind)), kind
    assert registry.failures == []
    assert {p.source for p in registry.plugins} == {"builtin"}


def test_third_party_plugin_loads_through_entry_point(install_plugin, monkeypatch):
    name = install_plugin(GOOD)
    registry = Registry()
    entry, _ = registry.get("exit_policy", "always")
    assert (entry.plugin, entry.version) == (name, "0.3.1")
    policy = registry.create("exit_policy", "always")
    import numpy as np

    assert policy.decide(3, np.array([[0.2], [0.9]])).tolist() == [True, True]


def test_broken_import_is_skipped_with_warning(install_plugin, monkeypatch):
    name = install_plugin("raise ImportError('needs libfoo')\n")
    with pytest.warns(PluginWarning, match=rf"skipped plugin '{name}': import failed: ImportError: needs libfoo"):
        registry = Registry()
    assert [f.name for f in registry.failures] == [name]
    assert "max-prob" in registry.names("exit_policy")  # the rest still works


def test_broken_import_raises_in_strict_mode(install_plugin, monkeypatch):
    name = install_plugin("raise ImportError('needs libfoo')\n")
    monkeypatch.setenv("MHEE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=rf"plugin '{name}' failed: import failed: ImportError: needs libfoo"):
        Registry()


def test_raising_hook_is_skipped_and_leaves_nothing_behind(install_plugin, monkeypatch):
    source = """
    from mhee_sdk import hookimpl

    @hookimpl
    def register_retrievers(register):
        register("half-done", object)
        raise RuntimeError("index not built")
    """
    name = install_plugin(source)
    with pytest.warns(PluginWarning, match=rf"'{name}': RuntimeError: index not built"):
        registry = Registry()
    assert "half-done" not in registry.names("retriever")
    assert name not in [p.name for p in registry.plugins]


def test_allow_list_loads_only_named_entry_points(install_plugin, monkeypatch):
    name = install_plugin(GOOD)
    monkeypatch.setenv("MHEE_PLUGINS", "something-else")
    with pytest.warns(PluginWarning, match=r"MHEE_PLUGINS / allow names 'something-else', which no plugin has"):
        assert "always" not in Registry().names("exit_policy")
    monkeypatch.setenv("MHEE_PLUGINS", f"{name}")
    assert "always" in Registry().names("exit_policy")


def test_any_plugin_can_be_switched_off_by_name(install_plugin, monkeypatch):
    name = install_plugin(GOOD)
    monkeypatch.setenv("MHEE_DISABLE_PLUGINS", f"{name},mhee_sdk.backbones.tiny")
    registry = Registry()
    assert "always" not in registry.names("exit_policy")
    assert "tiny" not in registry.names("backbone") and "smollm2-135m" in registry.names("backbone")
    assert sorted(registry.disabled) == sorted([name, "mhee_sdk.backbones.tiny"])
    assert Registry(disable=[]).names("backbone").count("tiny") == 1  # the argument wins over the variable
    with pytest.warns(PluginWarning, match=r"names 'mhee_sdk.backbone.tiny', which no plugin has"):
        Registry(disable=["mhee_sdk.backbone.tiny"])  # a typo is reported, not silently ignored


def test_strict_flag_must_be_a_flag(monkeypatch):
    monkeypatch.setenv("MHEE_STRICT_PLUGINS", "2")
    with pytest.raises(PluginError, match=r"MHEE_STRICT_PLUGINS='2' is not a flag; use 1 \(on\) or 0 \(off\)"):
        Registry()


def test_duplicate_name_names_both_plugins(install_plugin, monkeypatch):
    source = """
    from mhee_sdk import hookimpl

    @hookimpl
    def register_exit_policies(register):
        register("max-prob", dict)
    """
    name = install_plugin(source)
    message = rf"exit policy 'max-prob' is registered by both 'mhee_sdk.exits.policies' and '{name}'"
    with pytest.warns(PluginWarning, match=message):
        registry = Registry()
    assert registry.get("exit_policy", "max-prob")[0].plugin == "mhee_sdk.exits.policies"
    with pytest.raises(PluginError, match=message) as caught:
        Registry(strict=True)
    assert isinstance(caught.value.__cause__, DuplicateNameError)


def test_unknown_name_lists_the_choices(registry):
    with pytest.raises(UnknownNameError) as caught:
        registry.create("exit_policy", "maxprob")
    message = str(caught.value)
    assert message.startswith("exit policy 'maxprob' is unknown; choose from: calibrated, entropy, fixed-layer")
    assert "did you mean 'max-prob'?" in message
    with pytest.raises(ValueError, match="kind 'policy' is unknown"):
        registry.names("policy")


def test_family_names_pass_the_spec(registry):
    class Loader:
        @hookimpl
        def register_backbones(self, register):
            register("echo:", lambda spec, **kw: ("echo", spec, kw))

    registry.add_plugin(Loader(), "echo-plugin")
    assert registry.create("backbone", "echo:some/model", device="cpu") == ("echo", "some/model", {"device": "cpu"})
    assert "echo:<spec>" in registry.names("backbone")
    with pytest.raises(UnknownNameError):
        registry.create("backbone", "echo:")


def test_invalid_registration_is_reported(registry):
    class Bad:
        @hookimpl
        def register_datasets(self, register):
            register("Bad Name!", dict)

    with pytest.warns(PluginWarning, match="dataset name 'Bad Name!' is invalid"):
        registry.add_plugin(Bad(), "bad")


def _mhee(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mhee_sdk.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_plugins_json_lists_every_builtin():
    result = _mhee("plugins", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    listed = {(row["kind"], row["name"]) for row in payload["entries"]}
    for kind, names in BUILTINS.items():
        assert {(kind, name) for name in names} <= listed
    row = next(r for r in payload["entries"] if r["name"] == "max-prob")
    assert row["plugin"] == "mhee_sdk.exits.policies" and row["version"] == "0.1.0"


def test_cli_plugins_table_and_strict_failure(tmp_path):
    result = _mhee("plugins")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0].split() == ["name", "kind", "plugin", "version"]
    (tmp_path / "brokenmod.py").write_text("import not_a_real_module_xyz\n")
    dist = tmp_path / "brokenmod-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenmod\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mhee_sdk]\nbroken = brokenmod\n")
    env = {"PYTHONPATH": str(tmp_path)}
    lenient = _mhee("plugins", env=env)
    assert lenient.returncode == 0 and "skipped plugin 'broken'" in lenient.stderr
    strict = _mhee("plugins", env={**env, "MHEE_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "plugin 'broken' failed" in strict.stderr


def test_conformance_suite_accepts_builtin_policies_and_rejects_a_batch_dependent_one(registry):
    from mhee_sdk.testing import ContractError, check_exit_policy

    for name in BUILTINS["exit_policy"]:
        check_exit_policy(registry.create("exit_policy", name))

    class BatchMean:
        name = "batch-mean"

        def decide(self, layer, probs):
            return probs[:, -1] > probs[:, -1].mean()

    with pytest.raises(ContractError, match="depends on the other rows"):
        check_exit_policy(BatchMean())


def test_a_hookimpl_may_take_no_arguments(registry):
    class Quiet:
        @hookimpl
        def register_exit_policies(self):  # pluggy lets an implementation take any subset of the arguments
            pass

    registry.add_plugin(Quiet(), name="quiet")
    assert "quiet" in [p.name for p in registry.plugins] and registry.failures == []
