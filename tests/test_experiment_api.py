"""The notebook API of Experiment: cheap and lazy, keyword parameters, concise results, heads saved and
loaded, predictions for unlabeled requests, live objects in configs, speedups measured side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store

TINY = dict(backbone="tiny", retriever="recent", k=3, prompt_tokens=300, head="linear", exit_layers=[2, 4, 6],
            train_requests=60, valid_requests=40, eval_requests=24, batch_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    registry = Registry(load_entry_points=False)
    return Experiment(RunConfig(**TINY), registry=registry, progress=False,
                      cache_dir=tmp_path_factory.mktemp("hidden"))  # fmt: skip


def test_construction_is_cheap_and_says_what_is_built(tmp_path):
    experiment = Experiment(backbone="tiny", eval_requests=5, registry=Registry(load_entry_points=False),
                            progress=False, cache_dir=tmp_path)  # fmt: skip
    assert experiment.config.eval_requests == 5 and experiment.config.backbone == "tiny"  # keyword overrides
    assert not {"tables", "retriever", "backbone", "heads"} & set(vars(experiment))  # nothing heavy yet
    assert "built: nothing" in repr(experiment) and len(repr(experiment)) < 300


def test_keyword_parameters_equal_a_params_dict(experiment):
    by_keyword = experiment.run("max-prob", threshold=0.6)
    by_dict = experiment.run("max-prob", {"threshold": 0.6})
    assert [p.exit_layer for p in by_keyword.predictions] == [p.exit_layer for p in by_dict.predictions]
    assert by_keyword.label == "max-prob(threshold=0.6)"
    assert experiment.train_report is not None  # run() trained the heads it needed
    text = repr(by_keyword)
    assert text.startswith("RunResult('max-prob(threshold=0.6)'") and "24 requests" in text and len(text) < 200
    frame = by_keyword.frame
    assert list(frame["request_id"]) == [p.request_id for p in by_keyword.predictions]
    assert {"prob", "exit_layer", "latency_s", "layer_probs"} <= set(frame.columns)


def test_run_many_measures_speedups_beside_full_depth(experiment, tmp_path):
    store = Store.open(tmp_path / "runs.duckdb")
    full, early = experiment.run_many(["never", ("fixed-layer", {"layer": 2})], store=store)
    assert "speedup" not in full.metrics or full.metrics["speedup"] == pytest.approx(1.0)
    assert early.metrics["mean_exit_layer"] == 2 and early.metrics["layer_savings"] == pytest.approx(3.0)
    assert early.metrics["speedup_p25"] <= early.metrics["speedup"] * 1.5
    assert early.metrics["speedup"] == pytest.approx(full.seconds / early.seconds)
    assert store.metrics(early.run_id)["speedup"] == pytest.approx(early.metrics["speedup"])
    alone = experiment.run("fixed-layer", layer=2)
    assert "speedup" not in alone.metrics  # never a lone wall-clock ratio


def test_saved_heads_reload_to_identical_predictions(experiment, tmp_path):
    before = experiment.run("patience", patience=1)
    path = experiment.save_heads(tmp_path / "heads.pt")
    fresh = Experiment(RunConfig(**TINY), registry=experiment.registry, progress=False, cache_dir=tmp_path / "h")
    fresh.load_heads(path)
    assert fresh.train_report is None  # nothing was trained: the heads came from the file
    after = fresh.run("patience", patience=1)
    assert [p.exit_layer for p in after.predictions] == [p.exit_layer for p in before.predictions]
    np.testing.assert_allclose([p.prob for p in after.predictions], [p.prob for p in before.predictions], atol=1e-6)
    other = Experiment(RunConfig(**{**TINY, "backbone_params": {"seed": 1}}), registry=experiment.registry,
                       progress=False, cache_dir=tmp_path / "h2")  # fmt: skip
    with pytest.raises(ValueError, match=r"were trained on backbone 'tiny:L6:H64:seed0'.*runs 'tiny:L6:H64:seed1'"):
        other.load_heads(path)


def test_predict_scores_requests_without_labels(experiment):
    requests = experiment.requests()[:6]
    scored = experiment.run("never", requests=requests)
    unlabeled = pd.DataFrame({"user": [r.user for r in requests], "item": [r.item for r in requests],
                              "ts": [r.ts for r in requests]})  # fmt: skip
    predicted = experiment.predict(unlabeled, policy="never")
    assert list(predicted.columns) == ["request_id", "user", "item", "ts", "prob", "exit_layer", "latency_s"]
    np.testing.assert_allclose(predicted["prob"], [p.prob for p in scored.predictions], atol=1e-6)
    with pytest.raises(ValueError, match=r"needs the columns user, item, ts; missing \['ts'\]"):
        experiment.predict(unlabeled.drop(columns="ts"))


def test_engine_drives_requests_as_the_runs_do(experiment):
    """A script that runs the engine itself gets the runs' heads and system message: the same predictions."""
    requests = experiment.requests()[:8]
    texts, retrieved = experiment.prompts(requests)
    engine = experiment.engine(("max-prob", {"threshold": 0.6}))
    assert engine.system is not None and engine.system == experiment.system  # what the heads were trained with
    out = engine.run(texts, batch_size=4, progress=False, features=experiment.extra_features(requests, retrieved))
    ran = experiment.run("max-prob", threshold=0.6, requests=requests)
    assert [p.exit_layer for p in out] == [p.exit_layer for p in ran.predictions]
    np.testing.assert_allclose([p.prob for p in out], [p.prob for p in ran.predictions], atol=1e-6)
    with pytest.raises(ValueError, match="max-porb"):
        experiment.engine("max-porb")


def test_a_live_object_in_a_config_is_described_not_pickled(experiment, tmp_path):
    class MyIndex:
        def __deepcopy__(self, memo):  # like a LlamaIndex retriever holding a native handle
            raise TypeError("cobj cannot be converted to a Python object for pickling")

    config = RunConfig(**{**TINY, "retriever_params": {"index": MyIndex(), "label": "my index"}})
    described = config.to_dict()["retriever_params"]
    assert described["label"] == "my index" and described["index"]["__object__"].endswith("MyIndex")
    assert not config.reproducible and RunConfig(**TINY).reproducible


def test_requests_are_checked_before_the_engine_runs(experiment):
    from mhee_sdk.types import Request

    requests = experiment.requests()[:3]
    with pytest.raises(ValueError, match=r"request ids must be unique; repeated: \[" + str(requests[0].request_id)):
        experiment.run("never", requests=[requests[0], *requests])
    stranger = Request(10**9, 10**6, requests[0].item, 1, requests[0].ts)
    with pytest.raises(ValueError, match=r"1 requests name users or items the dataset 'movielens-100k' does not have"):
        experiment.run("never", requests=[*requests, stranger])
    unlabeled = Request(10**9, requests[0].user, requests[0].item, -1, requests[0].ts)
    with pytest.raises(ValueError, match="labels outside"):
        experiment.run("never", requests=[unlabeled])
    assert len(experiment.predict([stranger])) == 1  # new traffic: allowed, reported
