from __future__ import annotations

import numpy as np
import pytest
import torch

from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.exits.heads import build_heads
from mhee_sdk.exits.policies import replay
from mhee_sdk.registry import Registry
from mhee_sdk.train import collect_hidden

POLICIES = [
    ("never", {}),
    ("fixed-layer", {"layer": 3}),
    ("max-prob", {"threshold": 0.8}),
    ("entropy", {"threshold": 0.6}),
    ("margin", {"threshold": 0.7}),
    ("patience", {"patience": 1}),
    ("multi-head", {"ratio": 2.0, "window": 2}),
    ("calibrated", {"thresholds": {2: 0.85, 3: 0.8, 4: 0.75, 5: 0.7}}),
]


@pytest.fixture(scope="module")
def prompts(movielens):
    tables = movielens.load()
    from mhee_sdk.data.prompt import PromptBuilder
    from mhee_sdk.retrievers.simple import RecentRetriever

    requests = movielens.requests("test", limit=40, seed=5)
    retriever = RecentRetriever().fit(tables.split("train"), movielens.log)
    # byte tokens: keep the tiny run fast
    builder = PromptBuilder(tables.users, tables.items, max_tokens=260, template=movielens.prompt_template)
    return builder.build_many(requests, retriever.retrieve(requests, 5)), [r.request_id for r in requests]


@pytest.fixture(scope="module")
def heads(tiny, prompts, tmp_path_factory):
    """Linear heads on every layer with outputs spread over (0, 1), so policies exit at many depths."""
    registry = Registry(load_entry_points=False)
    heads = build_heads("linear", tiny, layers=range(1, tiny.num_layers + 1), registry=registry)
    features = collect_hidden(tiny, prompts[0], heads.layers, cache_dir=tmp_path_factory.mktemp("h"), progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for j, layer in enumerate(heads.layers):
            heads[layer].standardize.fit(torch.as_tensor(np.asarray(features[:, j], dtype=np.float32)))
            heads[layer].linear.weight.copy_(torch.randn(1, tiny.hidden_size, generator=generator) * 0.15)
    return heads


@pytest.fixture(scope="module")
def logged(tiny, heads, prompts):
    """Full-depth per-layer outputs ``[N, L]``, as a store would log them."""
    return full_depth(tiny, heads, prompts)


def full_depth(tiny, heads, prompts):
    engine = EarlyExitEngine(tiny, heads, Registry(load_entry_points=False).create("exit_policy", "never"))
    predictions = engine.run(prompts[0], prompts[1], batch_size=32, progress=False)
    return np.array([p.layer_probs for p in predictions])


def test_never_equals_full_depth_heads(tiny, heads, prompts):
    probs = full_depth(tiny, heads, prompts)
    assert probs.shape == (40, tiny.num_layers)
    assert probs.std() > 0.1  # heads really spread, so the policy tests below are meaningful
    with torch.inference_mode():
        state = tiny.start(prompts[0])
        expected = []
        for layer in range(1, tiny.num_layers + 1):
            state = tiny.step(state)
            expected.append(heads[layer](tiny.pooled(state)).numpy())
    np.testing.assert_allclose(probs, np.stack(expected, axis=1), atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_engine_equals_replay_of_full_depth(tiny, heads, prompts, logged, name, params, batch_size):
    registry = Registry(load_entry_points=False)
    policy = registry.create("exit_policy", name, **params)
    expected = replay(policy, logged, heads.layers)
    live = EarlyExitEngine(tiny, heads, policy).run(prompts[0], prompts[1], batch_size=batch_size, progress=False)
    assert [p.request_id for p in live] == prompts[1]
    assert [p.exit_layer for p in live] == expected.layer.tolist()
    np.testing.assert_allclose([p.prob for p in live], expected.prob, atol=1e-5)
    for p, row in zip(live, logged, strict=True):
        np.testing.assert_allclose(p.layer_probs, row[: len(p.layer_probs)], atol=1e-5)
    if name != "never":
        assert len(set(expected.layer.tolist())) > 1 or name == "fixed-layer"


def test_compaction_skips_work(tiny, heads, prompts):
    policy = Registry(load_entry_points=False).create("exit_policy", "max-prob", threshold=0.7)
    tiny.rows_evaluated = 0
    predictions = EarlyExitEngine(tiny, heads, policy).run(prompts[0], prompts[1], batch_size=16, progress=False)
    exit_layers = [p.exit_layer for p in predictions]
    assert tiny.rows_evaluated == sum(exit_layers)
    assert tiny.rows_evaluated < len(prompts[0]) * tiny.num_layers * 0.9  # really fewer than batch x depth


def test_engine_validates_inputs(tiny, heads, prompts):
    engine = EarlyExitEngine(tiny, heads, Registry(load_entry_points=False).create("exit_policy", "never"))
    with pytest.raises(ValueError, match="batch_size=0"):
        engine.run(prompts[0], batch_size=0)
    with pytest.raises(ValueError, match="2 prompts but 1 request ids"):
        engine.run(prompts[0][:2], [1])

    class Wrong:
        name = "wrong"

        def decide(self, layer, probs):
            return np.array([True])

    with pytest.raises(ValueError, match="policy 'wrong' returned shape"):
        EarlyExitEngine(tiny, heads, Wrong()).run(prompts[0][:3], progress=False)


def test_hybrid_heads_need_features_in_the_engine(tiny, prompts):
    registry = Registry(load_entry_points=False)
    heads = build_heads("hybrid", tiny, registry=registry, feature_size=3)
    engine = EarlyExitEngine(tiny, heads, registry.create("exit_policy", "never"))
    with pytest.raises(ValueError, match="pass features="):
        engine.run(prompts[0][:4], progress=False)
    features = np.random.default_rng(0).normal(size=(4, 3))
    out = engine.run(prompts[0][:4], features=features, batch_size=3, progress=False)
    shuffled = engine.run(prompts[0][:4][::-1], features=features[::-1], batch_size=4, progress=False)
    np.testing.assert_allclose([p.prob for p in out], [p.prob for p in shuffled][::-1], atol=1e-5)
