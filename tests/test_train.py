from __future__ import annotations

import numpy as np
import pytest
import torch

from mhee_sdk.exits.heads import build_heads
from mhee_sdk.registry import Registry
from mhee_sdk.train import TrainConfig, cache_key, collect_hidden, depth_lr, fit_heads

TEXTS = [f"User {i}: likes {'comedy' if i % 2 else 'drama'} movies. Candidate: movie {i}" for i in range(24)]


class InterruptAfter:
    """The tiny backbone, but the run is interrupted (as by Ctrl-C) after `batches` batches."""

    def __init__(self, backbone, batches):
        self.backbone, self.left = backbone, batches

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def start(self, texts, **options):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.backbone.start(texts, **options)


def test_hidden_states_are_cached_and_reused(tiny, tmp_path):
    tiny.rows_evaluated = 0
    first = collect_hidden(tiny, TEXTS, [2, 4], batch_size=8, cache_dir=tmp_path, progress=False)
    assert first.shape == (24, 2, tiny.hidden_size) and first.dtype == np.float16
    assert tiny.rows_evaluated == 24 * 4
    again = collect_hidden(tiny, TEXTS, [2, 4], batch_size=8, cache_dir=tmp_path, progress=False)
    assert tiny.rows_evaluated == 24 * 4  # the backbone did not run again
    np.testing.assert_array_equal(first, again)
    with torch.inference_mode():
        state = tiny.start(TEXTS[:3])
        for _ in range(4):
            state = tiny.step(state)
    np.testing.assert_allclose(first[:3, 1], tiny.pooled(state).numpy(), rtol=2e-3, atol=2e-3)


def test_cache_key_changes_with_prompts_layers_and_model():
    base = cache_key("m1", [3, 6], TEXTS)
    assert base == cache_key("m1", [3, 6], list(TEXTS))
    assert base != cache_key("m1", [3, 6], [*TEXTS[:-1], TEXTS[-1] + " "])  # prompt template change
    assert base != cache_key("m1", [3], TEXTS)
    assert base != cache_key("m2", [3, 6], TEXTS)


def test_interrupted_collection_resumes(tiny, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        collect_hidden(InterruptAfter(tiny, 2), TEXTS, [4], batch_size=5, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.partial.npy"))) == 1
    tiny.rows_evaluated = 0
    resumed = collect_hidden(tiny, TEXTS, [4], batch_size=5, cache_dir=tmp_path, progress=False)
    assert tiny.rows_evaluated == (24 - 10) * 4  # only the missing rows ran
    fresh = collect_hidden(tiny, TEXTS, [4], batch_size=24, cache_dir=tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(resumed, fresh, rtol=2e-3, atol=2e-3)
    assert not list(tmp_path.glob("*.partial.*"))


def synthetic_features(n, layers, hidden, seed):
    """Label signal that grows with depth, in a few dimensions, plus one huge nuisance dimension."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, layers, hidden))
    x[:, :, :4] += (2 * labels - 1)[:, None, None] * np.linspace(0.1, 1.0, layers)[None, :, None]
    x[:, :, 5] *= 500.0
    return x.astype(np.float16), labels


def test_fit_heads_learns_and_deeper_heads_do_better(tiny):
    heads = build_heads("linear", tiny, layers=[2, 4, 6], registry=Registry(load_entry_points=False))
    x_train, y_train = synthetic_features(600, 3, tiny.hidden_size, 0)
    x_valid, y_valid = synthetic_features(300, 3, tiny.hidden_size, 1)
    report = fit_heads(heads, x_train, y_train, x_valid, y_valid, tiny.num_layers, TrainConfig(progress=False))
    assert report.valid_auc[6] > 0.9
    assert report.valid_auc[2] < report.valid_auc[4] < report.valid_auc[6]
    assert all(report.best_epoch[layer] < report.epochs_run for layer in heads.layers)


def test_depth_aware_learning_rates():
    schedule = depth_lr(1e-3, boost=1.0)
    rates = [schedule(layer, 30) for layer in (3, 15, 30)]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] == pytest.approx(1.9e-3) and rates[-1] == pytest.approx(1e-3)
    assert depth_lr(1e-3, boost=0.0)(3, 30) == depth_lr(1e-3, boost=0.0)(30, 30)
    with pytest.raises(ValueError, match="base > 0"):
        depth_lr(0.0)


def test_fit_heads_rejects_mismatched_inputs(tiny):
    heads = build_heads("linear", tiny, layers=[2, 4], registry=Registry(load_entry_points=False))
    x, y = synthetic_features(50, 3, tiny.hidden_size, 0)
    with pytest.raises(ValueError, match=r"train features must be \[N, 2, H\]"):
        fit_heads(heads, x, y, x, y, tiny.num_layers)
    x, y = synthetic_features(50, 2, tiny.hidden_size, 0)
    with pytest.raises(ValueError, match="both classes"):
        fit_heads(heads, x, np.zeros(50), x, y, tiny.num_layers)


def test_verbalizer_matches_the_lm_answer(tiny):
    heads = build_heads("verbalizer", tiny, registry=Registry(load_entry_points=False))
    assert heads.layers == [3, 6] and not heads.trainable
    with torch.inference_mode():
        state = tiny.start(TEXTS[:4])
        for _ in range(tiny.num_layers):
            state = tiny.step(state)
        prob = heads[6](tiny.pooled(state))
        batch = tiny.tokenizer([tiny.format(t) for t in TEXTS[:4]], padding=True, return_tensors="pt")
        logits = tiny.model(**batch, position_ids=state.extras["positions"]).logits[:, -1]
    yes, no = tiny.answer_token_ids()
    expected = torch.softmax(logits[:, [yes, no]], dim=-1)[:, 0]
    torch.testing.assert_close(prob, expected, atol=1e-5, rtol=0)


def test_hybrid_head_uses_collaborative_features(tiny):
    heads = build_heads("hybrid", tiny, layers=[3, 6], registry=Registry(load_entry_points=False), feature_size=2)
    assert heads.needs_features
    x_train, y_train = synthetic_features(400, 2, tiny.hidden_size, 0)
    x_valid, y_valid = synthetic_features(200, 2, tiny.hidden_size, 1)
    x_train[:, :, :4], x_valid[:, :, :4] = 0, 0  # no signal in the hidden state ...
    rng = np.random.default_rng(0)
    f_train = np.stack([y_train + rng.normal(0, 0.5, 400), rng.normal(0, 1, 400)], 1)  # ... only in the features
    f_valid = np.stack([y_valid + rng.normal(0, 0.5, 200), rng.normal(0, 1, 200)], 1)
    with pytest.raises(ValueError, match="pass train_extra and valid_extra"):
        fit_heads(heads, x_train, y_train, x_valid, y_valid, tiny.num_layers)
    config = TrainConfig(progress=False)
    report = fit_heads(heads, x_train, y_train, x_valid, y_valid, tiny.num_layers, config, f_train, f_valid)
    assert report.valid_auc[3] > 0.85 and report.valid_auc[6] > 0.85
