"""`mhee export mlflow`: runs of a tiny-backbone store read back with MLflow's own client."""

from __future__ import annotations

import json
import sys

import pytest

from mhee_sdk.cli import main
from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.export import RUN_ID_TAG, ExtraNotInstalled, export_mlflow, flatten
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (in dev) is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = dict(
    backbone="tiny", retriever="recent", k=3, prompt_tokens=300, head="linear", exit_layers=[1, 2, 3, 4, 5, 6],
    train_requests=80, valid_requests=60, eval_requests=30, batch_size=8,
)  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a full-depth run, a max-prob run and a baseline on the same 30 requests."""
    tmp = tmp_path_factory.mktemp("export")
    experiment = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False,
                            cache_dir=tmp / "hidden")  # fmt: skip
    experiment.fit_heads()
    store = Store.open(tmp / "runs.duckdb")
    experiment.run("never", store=store)
    experiment.run("max-prob", {"threshold": 0.6}, store=store)
    experiment.run_baseline("popularity", store=store)
    return Store.open(store.path, read_only=True)


def test_flatten_nests_with_dots_and_keeps_lists_as_json():
    config = {"policy": "max-prob", "policy_params": {"threshold": 0.7}, "exit_layers": [1, 2], "seed": None,
              "retriever_params": {}}  # fmt: skip
    assert flatten(config) == {"policy": "max-prob", "policy_params.threshold": "0.7", "exit_layers": "[1, 2]",
                               "seed": "None", "retriever_params": "{}"}  # fmt: skip


def test_runs_read_back_with_mlflows_client(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts of a sqlite store under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exported = export_mlflow(store, tracking_uri=uri, experiment="tiny")
    runs = store.runs()
    assert [run.run_id for run in exported] == list(runs["run_id"]) and all(run.new for run in exported)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    found = {run.data.tags[RUN_ID_TAG]: run for run in client.search_runs([experiment.experiment_id])}
    assert found.keys() == set(runs["run_id"])
    for record in runs.itertuples():
        run = found[record.run_id]
        stored = store.run(record.run_id)
        assert run.info.run_name == record.name and run.info.status == "FINISHED"
        assert run.data.tags["mhee.kind"] == record.kind
        assert run.data.params == {**flatten(stored["config"]), "exit_layers": json.dumps(stored["exit_layers"]),
                                   "num_layers": str(stored["num_layers"])}  # fmt: skip
        if record.kind == "baseline":
            assert run.data.params["baseline"] == "popularity" and run.data.params["exit_layers"] == "[]"
        else:
            assert run.data.params["backbone"] == "tiny" and run.data.params["retriever"] == "recent"
            assert run.data.params["exit_layers"] == "[1, 2, 3, 4, 5, 6]" and run.data.params["num_layers"] == "6"
        expected = {name.replace("@", "/"): value for name, value in store.metrics(record.run_id).items()}
        assert run.data.metrics == pytest.approx(expected, nan_ok=True)  # slices: auc@cold_items -> auc/cold_items
        names = sorted(item.path for item in client.list_artifacts(run.info.run_id))
        expected = ["pareto.png"] if record.kind == "baseline" else [f"exits_{record.run_id}.png", "pareto.png"]
        assert names == expected
        for name in names:
            local = client.download_artifacts(run.info.run_id, name, str(tmp_path / "download" / record.run_id))
            with open(local, "rb") as image:
                assert image.read(8) == PNG
    max_prob = next(run for run in found.values() if run.data.params.get("policy") == "max-prob")
    assert max_prob.data.params["policy_params.threshold"] == "0.6"
    assert 0 < max_prob.data.metrics["mean_exit_layer"] < 6

    again = export_mlflow(store, tracking_uri=uri, experiment="tiny")  # nothing twice
    assert not any(run.new for run in again)
    assert [run.mlflow_run_id for run in again] == [run.mlflow_run_id for run in exported]
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)


def test_cli_exports_chosen_runs_and_rejects_unknown_ones(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = store.runs()["run_id"].iloc[0]
    args = ["export", "mlflow", first, "--store", str(store.path), "--tracking-uri", uri, "--experiment", "cli"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 of 1 runs newly exported to MLflow experiment 'cli'"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.data.tags[RUN_ID_TAG] == first
    with pytest.raises(ValueError, match="not finished runs"):
        export_mlflow(store, ["nosuchrun"], tracking_uri=uri)


def test_without_the_extra_one_line_names_the_install(store, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if mlflow were not installed
    with pytest.raises(ExtraNotInstalled, match=r"pip install 'mhee-sdk\[mlflow\]'"):
        export_mlflow(store)
    assert main(["export", "mlflow", "--store", str(store.path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("Error: exporting to MLflow needs the mlflow extra: pip install 'mhee-sdk[mlflow]'")
    assert error.count("\n") == 1
