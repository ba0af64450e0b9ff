"""Real SmolLM2-135M on a few MovieLens requests (marked slow: `pytest -m slow`)."""

from __future__ import annotations

import numpy as np
import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment():
    config = RunConfig(retriever="recent", k=5, prompt_tokens=128, head="verbalizer", eval_requests=12, batch_size=6)
    return Experiment(config, progress=False)


def test_verbalizer_early_exit_on_smollm2_replays_exactly(experiment, tmp_path):
    assert experiment.heads.layers == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    store = Store.open(tmp_path / "runs.duckdb")
    full = experiment.run("never", store=store)
    assert all(p.exit_layer == 30 for p in full.predictions)
    live = experiment.run("max-prob", {"threshold": 0.6}, store=store)
    replayed = store.replay(full.run_id, experiment.make_policy("max-prob", {"threshold": 0.6})).predictions
    live_frame = store.predictions(live.run_id)
    assert live_frame["exit_layer"].tolist() == replayed["exit_layer"].tolist()
    np.testing.assert_allclose(live_frame["prob"], replayed["prob"], atol=1e-5)
    assert live.metrics["mean_exit_layer"] < 30


def test_prompts_fit_the_token_budget(experiment):
    texts, _ = experiment.prompts(experiment.requests())
    assert max(experiment.backbone.count_tokens(t) for t in texts) <= 128
