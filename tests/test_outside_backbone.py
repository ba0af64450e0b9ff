"""A backbone from outside: no transformers code, written against interfaces.py and docs/plugins.md only.

It is installed as a third-party plugin (an entry point in a tmp package) and run end to end: the
conformance check, heads trained on it, a live run, replay = live, and the notebook widgets on its runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store
from mhee_sdk.testing import check_backbone
from mhee_sdk.widgets import ExitExplorer, PolicyTuner

BYTE_MIXER = '''
"""A stack of residual MLP blocks over byte embeddings: each block mixes a token with the mean of the
real tokens up to it (causal, padding-blind). Not a transformer, and no Hugging Face code."""

from dataclasses import replace

import torch
from torch import nn

from mhee_sdk import hookimpl
from mhee_sdk.interfaces import LayerState

PAD = 256


class ByteMixer:
    name = "byte-mixer"

    def __init__(self, num_layers: int = 4, hidden_size: int = 32, seed: int = 0, max_bytes: int = 400) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(257, hidden_size, generator=generator) * 0.5
        self.blocks = [
            (torch.randn(2 * hidden_size, hidden_size, generator=generator) / (2 * hidden_size) ** 0.5,
             torch.randn(hidden_size, generator=generator) * 0.1)
            for _ in range(num_layers)
        ]
        self.num_layers, self.hidden_size, self.max_bytes = num_layers, hidden_size, max_bytes
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.fingerprint = f"byte-mixer:L{num_layers}:H{hidden_size}:seed{seed}"

    def count_tokens(self, text: str) -> int:
        return len(text.encode())

    def start(self, texts, prefix=None, system=None) -> LayerState:
        if not texts:
            raise ValueError("start() needs at least one prompt")
        rows = [list(((system or "") + text).encode())[-self.max_bytes :] or [PAD] for text in texts]
        width = max(len(row) for row in rows)
        ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])  # left padding
        mask = (ids != PAD).long()
        return LayerState(hidden=self.embedding[ids] * mask[..., None], mask=mask)

    def step(self, state: LayerState) -> LayerState:
        if state.layers_done >= self.num_layers:
            raise ValueError(f"all {self.num_layers} layers already ran")
        weight, bias = self.blocks[state.layers_done]
        real = state.mask[..., None].float()
        context = (state.hidden * real).cumsum(1) / real.cumsum(1).clamp(min=1.0)
        update = torch.tanh(torch.cat([state.hidden, context], dim=-1) @ weight + bias)
        return replace(state, hidden=(state.hidden + update) * real, layers_done=state.layers_done + 1)

    def pooled(self, state: LayerState) -> torch.Tensor:
        return state.hidden[:, -1, :]


@hookimpl
def register_backbones(register):
    register("byte-mixer", ByteMixer)
'''

CONFIG = dict(
    backbone="byte-mixer", retriever="recent", k=3, prompt_tokens=400, head="linear", exit_layers=[1, 2, 3, 4],
    train_requests=80, valid_requests=60, eval_requests=40, batch_size=16,
)  # fmt: skip


@pytest.fixture
def registry(install_plugin) -> Registry:
    name = install_plugin(BYTE_MIXER, ep_name="byte-mixer-plugin")
    registry = Registry()
    assert registry.get("backbone", "byte-mixer")[0].plugin == name
    return registry


def test_an_outside_backbone_keeps_the_contract(registry):
    check_backbone(registry.create("backbone", "byte-mixer"))


def test_an_outside_backbone_runs_end_to_end(registry, tmp_path):
    experiment = Experiment(RunConfig(**CONFIG), registry=registry, progress=False, cache_dir=tmp_path / "hidden")
    report = experiment.fit_heads()
    assert report is not None and set(report.valid_auc) == {1, 2, 3, 4}
    store = Store.open(tmp_path / "runs.duckdb")
    full = experiment.run("never", store=store)
    assert [p.exit_layer for p in full.predictions] == [4] * 40
    live = experiment.run("max-prob", {"threshold": 0.55}, store=store)
    exits = [p.exit_layer for p in live.predictions]
    assert min(exits) < 4  # it really exits early, so replay = live below is not trivially true
    replayed = store.replay(full.run_id, experiment.make_policy("max-prob", {"threshold": 0.55})).predictions
    assert replayed["exit_layer"].tolist() == exits
    np.testing.assert_allclose(replayed["prob"], [p.prob for p in live.predictions], atol=1e-6)
    tuner = PolicyTuner(store, full.run_id, registry=registry)
    tuner.sliders["threshold"].value = 0.55
    assert tuner.current_metrics["mean_exit_layer"] == pytest.approx(float(np.mean(exits)))
    explorer = ExitExplorer(store, live.run_id, registry=registry)
    assert explorer.thresholds == pytest.approx([0.45, 0.55])
    assert "Candidate:" in explorer.prompt.value
