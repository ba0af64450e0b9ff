"""The notebook widgets driven from Python over a real store of a tiny run."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.exits.policies import MaxProb, MultiHead
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store
from mhee_sdk.widgets import ExitExplorer, PolicyTuner, RunBrowser
from mhee_sdk.widgets.explorer import confidence_thresholds
from mhee_sdk.widgets.rendering import output_pngs

TINY = dict(
    backbone="tiny", retriever="recent", k=3, prompt_tokens=300, head="linear", exit_layers=[1, 2, 3, 4, 5, 6],
    train_requests=80, valid_requests=60, eval_requests=30, batch_size=8,
)  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A store with a full-depth run and a live max-prob run of the same 30 requests."""
    tmp = tmp_path_factory.mktemp("widgets")
    registry = Registry(load_entry_points=False)
    experiment = Experiment(RunConfig(**TINY), registry=registry, progress=False, cache_dir=tmp / "hidden")
    experiment.fit_heads()
    store = Store.open(tmp / "runs.duckdb")
    full = experiment.run("never", store=store)
    early = experiment.run("max-prob", {"threshold": 0.6}, store=store)
    assert early.metrics["mean_exit_layer"] < 6  # it really exits early, so the views have something to show
    return store, full.run_id, early.run_id, registry


def _same_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert actual.keys() == expected.keys()
    assert actual == pytest.approx(expected, abs=0, nan_ok=True)


def test_tuner_labels_equal_the_store_replay(runs):
    store, full, _, registry = runs
    tuner = PolicyTuner(store, full, registry=registry)
    assert "calibrated" not in tuner.policy_select.options and "max-prob" in tuner.policy_select.options
    tuner.policy_select.value = "max-prob"
    tuner.sliders["threshold"].value = 0.62
    expected = store.replay(full, MaxProb(threshold=0.62)).metrics
    _same_metrics(tuner.current_metrics, expected)
    assert expected["mean_exit_layer"] < 6
    assert tuner.metric_labels["auc"].value == f"AUC {expected['auc']:.4f}"
    assert tuner.metric_labels["logloss"].value == f"LogLoss {expected['logloss']:.4f}"
    assert tuner.metric_labels["mean_exit_layer"].value == f"mean exit layer {expected['mean_exit_layer']:.2f}"
    assert tuner.metric_labels["layer_savings"].value == f"est. speedup {6 / expected['mean_exit_layer']:.2f}x"

    tuner.policy_select.value = "multi-head"
    assert set(tuner.sliders) == {"ratio", "window"}
    tuner.sliders["ratio"].value = 1.5
    tuner.sliders["window"].value = 1
    _same_metrics(tuner.current_metrics, store.replay(full, MultiHead(ratio=1.5, window=1)).metrics)
    assert tuner.current_params == {"ratio": 1.5, "window": 1}

    tuner.policy_select.value = "fixed-layer"
    assert list(tuner.sliders["layer"].options) == [1, 2, 3, 4, 5, 6]
    tuner.sliders["layer"].value = 2
    assert tuner.current_metrics["mean_exit_layer"] == 2.0
    assert tuner.metric_labels["mean_exit_layer"].value == "mean exit layer 2.00"
    assert base64.b64decode(output_pngs(tuner.pareto)[0]).startswith(PNG)
    assert ("fixed-layer", ()) in tuner.sweeps  # the Pareto sweep is cached per policy


def test_save_as_run_records_the_replay(runs):
    store, full, _, registry = runs
    tuner = PolicyTuner(store, full, policy="max-prob", registry=registry)
    tuner.sliders["threshold"].value = 0.7
    replay = store.replay(full, MaxProb(threshold=0.7))
    run_id = tuner.save_as_run()
    record = store.run(run_id)
    assert record["status"] == "finished" and record["kind"] == "replay" and record["parent_run"] == full
    assert record["config"]["policy"] == "max-prob" and record["config"]["policy_params"] == {"threshold": 0.7}
    saved = store.predictions(run_id)
    assert saved["request_id"].tolist() == replay.predictions["request_id"].tolist()
    assert saved["exit_layer"].tolist() == replay.predictions["exit_layer"].tolist()
    np.testing.assert_allclose(saved["prob"], replay.predictions["prob"], atol=0)
    assert saved["item"].tolist() == store.predictions(full)["item"].tolist()
    _same_metrics(store.metrics(run_id), replay.metrics)
    assert run_id in tuner.status.value

    explorer = ExitExplorer(store, run_id)  # a replay run shows its parent's prompts and head outputs
    assert explorer.evidence_run == full and "Candidate:" in explorer.prompt.value
    assert explorer.thresholds == pytest.approx([0.3, 0.7])


def test_read_only_store_disables_saving(runs):
    store, full, _, registry = runs
    tuner = PolicyTuner(Store.open(store.path, read_only=True), full, registry=registry)
    assert tuner.save_button.disabled and "read-only" in tuner.save_button.tooltip
    assert tuner.current_metrics  # replay needs no writes


def test_tuner_rejects_a_run_that_is_not_full_depth(runs):
    store, full, early, registry = runs
    with pytest.raises(ValueError, match=rf"full-depth run \(policy 'never'.*'{early}'.*policy 'max-prob'.*{full}"):
        PolicyTuner(store, early, registry=registry)


def test_explorer_shows_the_picked_request(runs):
    store, _, early, _ = runs
    explorer = ExitExplorer(store, early)
    assert explorer.thresholds == pytest.approx([0.4, 0.6])  # max-prob 0.6 on both sides of 0.5
    predictions = store.predictions(early).set_index("request_id")
    stored = store.requests(early).set_index("request_id")
    shallow = int(predictions.index[predictions["exit_layer"] < 6][0])
    explorer.request_select.value = shallow
    exit_layer = predictions.loc[shallow, "exit_layer"]
    assert f"exited at layer {exit_layer}</b>" in explorer.summary.value
    assert html.escape(stored.loc[shallow, "prompt"]) in explorer.prompt.value
    retrieved = json.loads(stored.loc[shallow, "retrieved"])
    assert retrieved and explorer.retrieved.value.count("<tr>") == len(retrieved)  # body rows (the header is styled)
    assert all(f"<td>{found['item']}</td>" in explorer.retrieved.value for found in retrieved)
    assert base64.b64decode(output_pngs(explorer.trace)[0]).startswith(PNG)

    user = int(predictions.loc[shallow, "user"])
    explorer.search.value = str(user)
    picked = [value for _, value in explorer.request_select.options]
    assert shallow in picked and all(str(user) in f"{r} {predictions.loc[r, 'user']} {predictions.loc[r, 'item']}"
                                     for r in picked)  # fmt: skip
    explorer.search.value = "no such request"
    assert explorer.request_select.value is None and "no request matches" in explorer.summary.value


def test_browser_compares_two_runs(runs):
    store, full, early, _ = runs
    browser = RunBrowser(store)
    assert {full, early} <= set(browser.runs["run_id"])
    assert browser.runs["run_id"].is_unique
    browser.filter_text.value = early
    assert [value for _, value in browser.run_select.options] == [early]
    browser.filter_text.value = ""
    browser.sort_select.value = "mean exit layer, shallowest first"
    assert browser.visible_runs["mean_exit_layer"].is_monotonic_increasing
    browser.compare([full, early])
    assert f"never ({full})" in browser.comparison.value
    assert f"max-prob(threshold=0.6) ({early})" in browser.comparison.value
    assert f"{store.metrics(full)['auc']:.4g}" in browser.comparison.value
    assert "auc@cold_users" in browser.comparison.value and "requests@heavy_users" in browser.comparison.value
    assert len(output_pngs(browser.figures)) == 2  # Pareto points and exit histograms


def test_static_render_embeds_a_png(runs):
    store, full, _, registry = runs
    for widget in (PolicyTuner(store, full, registry=registry), RunBrowser(store)):
        bundle = widget._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle  # live frontends still get the widget
        assert '<div><img alt="plot" src="data:image/png;base64,' in bundle["text/html"]
        assert base64.b64decode(bundle["image/png"]).startswith(PNG)


def test_nbconvert_without_widget_state_shows_the_png(runs):
    nbconvert = pytest.importorskip("nbconvert", reason="nbconvert comes with voila (the dev extra)")
    import nbformat

    store, full, _, registry = runs
    bundle = PolicyTuner(store, full, registry=registry)._repr_mimebundle_()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("PolicyTuner(store, run_id)")])
    notebook.cells[0].outputs = [nbformat.v4.new_output("display_data", data=bundle)]
    page, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)  # as GitHub/nbviewer: no kernel, no state
    assert re.search(r"<img [^>]*src=\"data:image/png;base64,", page) and "AUC " in page


@pytest.mark.parametrize(
    ("policy", "params"),
    [("max-prob", {"threshold": 0.8}), ("margin", {"threshold": 0.5}), ("multi-head", {"ratio": 4.0, "window": 1}),
     ("entropy", {"threshold": 0.6})],
)  # fmt: skip
def test_trace_threshold_is_where_the_policy_starts_to_exit(policy, params):
    registry = Registry(load_entry_points=False)
    lines, per_layer = confidence_thresholds(policy, params, [1, 2], registry)
    assert per_layer == {} and len(lines) == 2
    level = lines[1]
    decide = registry.create("exit_policy", policy, **params).decide
    probs = np.array([[level - 1e-3], [level + 1e-3], [1 - level + 1e-3], [1 - level - 1e-3]])
    assert decide(1, probs).tolist() == [False, True, False, True]
    assert confidence_thresholds("patience", {"patience": 2}, [1, 2], registry) == ([], {})


def test_a_plugin_policy_gets_its_own_sliders_and_threshold_line(runs):
    from mhee_plugin_template import ConsecutiveConfident, plugin

    store, full, _, _ = runs
    registry = Registry(load_entry_points=False)
    registry.add_plugin(plugin, name="template")
    tuner = PolicyTuner(store, full, policy="consecutive-confident", registry=registry)
    assert list(tuner.sliders) == ["threshold", "count"]  # declared by the plugin, not known to the widget
    assert (tuner.sliders["threshold"].value, tuner.sliders["count"].value) == (0.8, 2)
    tuner.sliders["threshold"].value = 0.6
    tuner.sliders["count"].value = 1
    expected = store.replay(full, ConsecutiveConfident(count=1, threshold=0.6)).metrics
    _same_metrics(tuner.current_metrics, expected)
    assert expected["mean_exit_layer"] < 6
    run_id = tuner.save_as_run()
    explorer = ExitExplorer(store, run_id, registry=registry)
    assert explorer.thresholds == pytest.approx([0.4, 0.6])  # the plugin's own confidence_levels
