from __future__ import annotations

import numpy as np
import pytest
import torch

from mhee_sdk.adapters import load_adapter
from mhee_sdk.backbones.tiny import tiny_backbone
from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.exits.heads import build_heads
from mhee_sdk.finetune import FinetuneConfig, finetune
from mhee_sdk.registry import Registry

TEXTS = [f"Candidate: a {'comedy' if i % 2 else 'horror'} movie number {i}." for i in range(16)]
LABELS = [i % 2 for i in range(16)]


def test_lora_training_lowers_the_joint_exit_loss():
    backbone = tiny_backbone()
    heads = build_heads("linear", backbone, layers=[2, 4, 6], registry=Registry(load_entry_points=False))
    settings = FinetuneConfig(epochs=12, batch_size=8, lr=5e-3, head_lr=5e-3, progress=False)
    report, soft = finetune(backbone, heads, TEXTS, LABELS, settings)
    assert soft is None and report.steps == 24
    assert np.mean(report.losses[-4:]) < 0.8 * np.mean(report.losses[:4])
    trainable = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_soft_tokens_carry_collaborative_signal():
    backbone = tiny_backbone()
    heads = build_heads("linear", backbone, layers=[3, 6], registry=Registry(load_entry_points=False))
    rng = np.random.default_rng(0)
    collab = np.stack([np.array(LABELS) * 2.0 - 1 + rng.normal(0, 0.1, 16), rng.normal(0, 1, 16)], 1)
    texts = ["Candidate: a movie."] * 16  # the text says nothing; only the soft tokens can
    settings = FinetuneConfig(lora=False, soft_tokens=2, epochs=15, lr=1e-2, head_lr=1e-2, progress=False)
    report, soft = finetune(backbone, heads, texts, LABELS, settings, collab=collab)
    assert soft is not None and soft.count == 2
    assert np.mean(report.losses[-4:]) < 0.7 * np.mean(report.losses[:4])
    with pytest.raises(ValueError, match="soft tokens need collab vectors"):
        finetune(backbone, heads, texts, LABELS, settings)


def tiny_experiment(tmp_path, monkeypatch, requests: int) -> Experiment:
    """A tiny-backbone Experiment on the real MovieLens files, with a fresh $MHEE_HOME for its adapters."""
    from mhee_sdk import assets

    (tmp_path / "data").symlink_to(assets.home() / "data")
    monkeypatch.setenv("MHEE_HOME", str(tmp_path))
    config = RunConfig(backbone="tiny", retriever="recent", k=2, prompt_tokens=300, exit_layers=[3, 6],
                       train_requests=requests, valid_requests=requests, eval_requests=8, batch_size=8)  # fmt: skip
    return Experiment(config, registry=Registry(load_entry_points=False), progress=False, cache_dir=tmp_path / "hidden")


def test_experiment_finetune_saves_and_reloads_by_name(tmp_path, monkeypatch):
    experiment = tiny_experiment(tmp_path, monkeypatch, requests=24)
    before = experiment.backbone.fingerprint
    report = experiment.finetune("unit", FinetuneConfig(epochs=1, batch_size=8, progress=False))
    assert report.steps == 3 and (tmp_path / "adapters" / "unit" / "lora.safetensors").is_file()
    assert experiment.backbone.fingerprint.startswith(before + "+lora:unit:")
    assert experiment.config.backbone_params == {"adapter": "unit"}  # runs after fine-tuning record the adapter
    reloaded = tiny_backbone(adapter="unit")
    assert reloaded.fingerprint == experiment.backbone.fingerprint
    texts = ["Candidate: a comedy."]
    with torch.inference_mode():
        a, b = experiment.backbone.start(texts), reloaded.start(texts)
        for _ in range(6):
            a, b = experiment.backbone.step(a), reloaded.step(b)
    torch.testing.assert_close(a.hidden, b.hidden)
    with pytest.raises(FileNotFoundError, match=r"adapter .missing. not found.*available: unit"):
        load_adapter("missing")


def test_job_budget_is_split_and_a_spent_budget_is_refused(tmp_path, monkeypatch):
    from mhee_sdk.finetune import training_minutes

    assert training_minutes(55, spent=14, after=15) == 26
    with pytest.raises(ValueError, match=r"10.0-minute budget leaves no time to train.*--minutes"):
        training_minutes(10, spent=6, after=5)
    experiment = tiny_experiment(tmp_path, monkeypatch, requests=16)
    with pytest.raises(ValueError, match="leaves no time to train"):
        experiment.finetune("late", FinetuneConfig(max_minutes=1e-6, progress=False))
    assert not (tmp_path / "adapters" / "late").exists()
