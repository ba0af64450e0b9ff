from __future__ import annotations

import numpy as np
import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.registry import Registry, UnknownNameError
from mhee_sdk.store import Store
from mhee_sdk.validation import ConfigError

TINY = dict(
    backbone="tiny", retriever="recent", k=3, prompt_tokens=300, head="linear", exit_layers=[1, 2, 3, 4, 5, 6],
    train_requests=80, valid_requests=60, eval_requests=30, batch_size=8,
)  # fmt: skip
POLICIES = [
    ("max-prob", {"threshold": 0.6}),
    ("entropy", {"threshold": 0.95}),
    ("margin", {"threshold": 0.2}),
    ("patience", {"patience": 1}),
    ("multi-head", {"ratio": 1.3, "window": 2}),
    ("fixed-layer", {"layer": 4}),
    ("calibrated", {"budget": 0.05}),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    exp = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False,
                     cache_dir=tmp_path_factory.mktemp("hidden"))  # fmt: skip
    report = exp.fit_heads()
    assert report is not None and set(report.valid_auc) == {1, 2, 3, 4, 5, 6}
    return exp


@pytest.fixture(scope="module")
def store_and_full(experiment, tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("store") / "runs.duckdb")
    full = experiment.run("never", store=store)
    return store, full


def test_full_depth_run_is_stored(store_and_full, experiment):
    store, full = store_and_full
    preds = store.predictions(full.run_id)
    assert len(preds) == 30 and preds["exit_layer"].eq(6).all()
    by_id = {p.request_id: p for p in full.predictions}
    np.testing.assert_allclose(preds["prob"], [by_id[i].prob for i in preds["request_id"]], atol=0)
    assert store.metrics(full.run_id)["auc"] == pytest.approx(full.metrics["auc"])
    assert len(store.layer_outputs(full.run_id, int(preds["request_id"][0]))) == 6
    requests = store.requests(full.run_id)
    assert requests["prompt"].str.contains("Candidate:").all()
    record = store.run(full.run_id)
    assert record["config"]["backbone"] == "tiny" and record["config"]["policy"] == "never"


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_replay_equals_live(store_and_full, experiment, name, params):
    store, full = store_and_full
    live = experiment.run(name, params, store=store)
    policy = experiment.make_policy(name, params)
    replayed = store.replay(full.run_id, policy).predictions.set_index("request_id")
    live_frame = store.predictions(live.run_id).set_index("request_id")
    assert (live_frame["exit_layer"] == replayed.loc[live_frame.index, "exit_layer"]).all()
    np.testing.assert_allclose(live_frame["prob"], replayed.loc[live_frame.index, "prob"], atol=1e-5)
    # a policy run on its own has no full-depth run beside it: no speedup from a lone wall-clock pair
    # (Experiment.run_many measures it batch by batch; tests/test_experiment_api.py)
    assert "speedup" not in live.metrics and live.metrics["layer_savings"] >= 1.0
    assert live.metrics["mean_exit_layer"] < 6  # the policy really exits early, so the comparison means something


def test_unknown_names_in_a_config_list_the_choices():
    config = RunConfig(**{**TINY, "policy": "maxprob"})
    with pytest.raises(ConfigError, match=r"exit policy .maxprob. is unknown; choose from: .*max-prob"):
        Experiment(config, registry=Registry(load_entry_points=False), progress=False)  # before any work
    with pytest.raises(ConfigError, match="retriever 'bm25' is unknown; choose from:"):
        Experiment(RunConfig(retriever="bm25", backbone="tiny"), registry=Registry(load_entry_points=False))
    exp = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False)
    with pytest.raises(UnknownNameError, match=r"exit policy .maxprob. is unknown; choose from: .*max-prob"):
        exp.run("maxprob")


def test_config_validation_and_toml(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'polcy' \(did you mean 'policy'\?\)"):
        RunConfig.from_dict({"polcy": "never"})
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        RunConfig(split="dev")
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        RunConfig(batch_size=0)
    path = tmp_path / "run.toml"
    path.write_text('policy = "max-prob"\npolicy_params = { threshold = 0.8 }\nretriever = "recent"\n')
    config = RunConfig.from_toml(path)
    assert config.policy_params == {"threshold": 0.8} and config.label == "max-prob(threshold=0.8)"


def test_hybrid_heads_run_end_to_end_and_replay(tmp_path):
    config = RunConfig(**{**TINY, "head": "hybrid", "train_requests": 60, "valid_requests": 40, "eval_requests": 16})
    exp = Experiment(config, registry=Registry(load_entry_points=False), progress=False, cache_dir=tmp_path)
    exp.fit_heads()
    store = Store.open(tmp_path / "runs.duckdb")
    full = exp.run("never", store=store)
    live = exp.run("max-prob", {"threshold": 0.6}, store=store)
    replayed = store.replay(full.run_id, exp.make_policy("max-prob", {"threshold": 0.6})).predictions
    assert replayed["exit_layer"].tolist() == store.predictions(live.run_id)["exit_layer"].tolist()
