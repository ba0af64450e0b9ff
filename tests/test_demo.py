"""`mhee demo` picks its backbone: the one asked for, else the fine-tuned adapter 'demo' if saved, else frozen."""

from __future__ import annotations

import json

from mhee_sdk.demo import demo_backbone


def test_demo_uses_the_adapter_only_when_it_exists_and_says_which(tmp_path, monkeypatch):
    monkeypatch.setenv("MHEE_HOME", str(tmp_path))
    name, why = demo_backbone()
    assert name == "smollm2-135m" and "no fine-tuned adapter 'demo' found" in why
    (tmp_path / "adapters" / "demo").mkdir(parents=True)
    name, why = demo_backbone()
    assert name == "smollm2-135m", "a folder without adapter.json is not an adapter"
    (tmp_path / "adapters" / "demo" / "adapter.json").write_text(json.dumps({"config": {}}))
    name, why = demo_backbone()
    assert name == "smollm2-135m+lora:demo" and str(tmp_path / "adapters" / "demo") in why
    assert demo_backbone("tiny") == ("tiny", "using the backbone 'tiny' (--backbone)")
