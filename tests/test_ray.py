"""Executors: the local loop and a Ray Data actor pool give the same runs; faults never duplicate or lose a request.

The Ray tests share one local 2-CPU cluster (module fixture). Predictions are compared bit for bit:
both sides run torch with 1 thread (a Ray worker gets as many threads as its CPUs, here 1).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from mhee_sdk.cli import build_parser
from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.executors import ExecutorError, LocalExecutor, RayExecutor, start_local_ray
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store
from mhee_sdk.train import collect_hidden
from mhee_sdk.workers import FAULT_VARIABLE

TINY = dict(
    backbone="tiny", retriever="recent", k=3, prompt_tokens=300, head="linear", exit_layers=[1, 2, 3, 4, 5, 6],
    train_requests=80, valid_requests=60, eval_requests=48, batch_size=8,
)  # fmt: skip
BUILT_IN_POLICIES = {
    "never": {},
    "max-prob": {"threshold": 0.6},
    "entropy": {"threshold": 0.95},
    "margin": {"threshold": 0.2},
    "patience": {"patience": 1},
    "multi-head": {"ratio": 1.3, "window": 2},
    "fixed-layer": {"layer": 4},
    "calibrated": {"budget": 0.05},
}


class one_thread:  # lower case: reads like a function in `with`
    """torch with 1 intra-op thread inside the block, as a Ray worker with 1 CPU runs it (bit-equal sums)."""

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hidden")


@pytest.fixture(scope="module")
def local_exp(hidden_dir):
    exp = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False,
                     cache_dir=hidden_dir)  # fmt: skip
    with one_thread():
        exp.fit_heads()
    return exp


@pytest.fixture(scope="module")
def heads_file(local_exp, tmp_path_factory):
    return local_exp.save_heads(tmp_path_factory.mktemp("heads") / "heads.pt")


def ray_experiment(heads_file, hidden_dir, **settings) -> Experiment:
    """The same pipeline with executor="ray" (the Experiment override) and the local experiment's heads."""
    exp = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False,
                     cache_dir=hidden_dir, executor="ray", **settings)  # fmt: skip
    exp.load_heads(heads_file)
    return exp


# ------------------------------------------------------------------ no cluster needed
def test_bad_executor_settings_are_one_line_errors():
    for values, message in (({"executor": "spark"}, "executor='spark' is unknown; choose from: local, ray"),
                            ({"num_workers": 0}, "num_workers=0 must be a positive integer"),
                            ({"cpus_per_worker": 0}, "cpus_per_worker=0 must be a positive number"),
                            ({"gpus_per_worker": -1}, "gpus_per_worker=-1 must be a non-negative number"),
                            ({"ray_address": ""}, "ray_address='' must be a non-empty string")):  # fmt: skip
        with pytest.raises(ValueError, match=message) as err:
            RunConfig(**values)
        assert "\n" not in str(err.value)


def test_executor_settings_are_not_part_of_a_runs_identity(local_exp):
    ray_config = local_exp.config.replace(executor="ray", num_workers=2, cpus_per_worker=2.0)
    assert ray_config.label == local_exp.config.label
    requests = local_exp.requests()
    ray_side = Experiment(ray_config, registry=local_exp.registry, progress=False)
    ray_side.__dict__.update({name: local_exp.__dict__[name] for name in ("tables", "backbone", "heads")})
    assert ray_side.requests_key(requests) == local_exp.requests_key(requests)


def test_ray_executor_without_ray_names_the_extra(monkeypatch, heads_file, hidden_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    exp = Experiment(RunConfig(**TINY), registry=Registry(load_entry_points=False), progress=False,
                     cache_dir=hidden_dir, executor="ray")  # fmt: skip
    with pytest.raises(ImportError, match=r"^executor='ray' needs the ray extra: pip install 'mhee-sdk\[ray\]'$"):
        exp.run("never")
    assert "heads" not in exp.__dict__  # it failed before any work


def test_cli_eval_takes_executor_options():
    args = build_parser().parse_args(["eval", "run.toml", "--executor", "ray", "--ray-address", "auto",
                                      "--num-workers", "3"])  # fmt: skip
    assert (args.executor, args.ray_address, args.num_workers) == ("ray", "auto", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "run.toml", "--executor", "spark"])


class OutOfOrder:
    """An executor (in this process, but not 'in_process': workers rebuild the backbone) that delivers results
    in a scrambled order, and can stop after `stop_after` results as an interrupted run would."""

    in_process = False

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after

    def map(self, make_worker, items, shared=None):
        worker = make_worker(**(shared or {}))
        order = [i ^ 1 for i in range(len(items)) if i ^ 1 < len(items)] + ([len(items) - 1] if len(items) % 2 else [])
        for n, index in enumerate(order):  # 1, 0, 3, 2, ...
            if self.stop_after is not None and n == self.stop_after:
                raise KeyboardInterrupt
            yield index, worker(items[index])


def test_hidden_states_arriving_out_of_order_are_written_in_order_and_resume(local_exp, tmp_path):
    texts, _ = local_exp.prompts(local_exp.requests(limit=36))
    spec, layers = local_exp.backbone_spec(), local_exp.heads.layers
    with one_thread():
        expected = collect_hidden(local_exp.backbone, texts, layers, batch_size=8, cache_dir=tmp_path / "local",
                                  progress=False)  # fmt: skip
        with pytest.raises(KeyboardInterrupt):  # batches 1, 0, 3 arrive; rows of batches 0 and 1 are written
            collect_hidden(local_exp.backbone, texts, layers, batch_size=8, cache_dir=tmp_path / "scrambled",
                           progress=False, executor=OutOfOrder(stop_after=3), backbone_spec=spec)  # fmt: skip
        progress = next((tmp_path / "scrambled").glob("*.progress.json")).read_text()
        assert '"rows": 16' in progress
        resumed = collect_hidden(local_exp.backbone, texts, layers, batch_size=8, cache_dir=tmp_path / "scrambled",
                                 progress=False, executor=OutOfOrder(), backbone_spec=spec)  # fmt: skip
    assert resumed.shape == (36, 6, local_exp.backbone.hidden_size) and resumed.dtype == np.float16
    np.testing.assert_array_equal(resumed, expected)


class Interrupted:
    """An in-process executor whose run gets Ctrl-C after the first batch."""

    in_process = True

    def map(self, make_worker, items, shared=None):
        worker = make_worker(**(shared or {}))
        yield 0, worker(items[0])
        raise KeyboardInterrupt


def test_ctrl_c_during_a_run_marks_it_failed(local_exp, tmp_path, monkeypatch):
    monkeypatch.setattr(local_exp, "executor", Interrupted)
    store = Store.open(tmp_path / "runs.duckdb")
    with pytest.raises(KeyboardInterrupt):
        local_exp.run("never", store=store, requests=local_exp.requests(limit=16))
    runs = store.runs(include_failed=True)
    assert runs["status"].tolist() == ["failed"]
    assert store.run(runs["run_id"].iloc[0])["error"].startswith("KeyboardInterrupt")


def test_local_executor_maps_in_order():
    assert list(LocalExecutor().map(lambda scale: (lambda x: x * scale), [1, 2, 3], {"scale": 10})) == [
        (0, 10), (1, 20), (2, 30)]  # fmt: skip


# ------------------------------------------------------------------ one local Ray cluster for the rest
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="pip install 'mhee-sdk[ray]'")
    start_local_ray(num_cpus=2, attempts=3)  # a busy machine misses Ray's 15 s startup wait (ray#65983)
    yield ray
    ray.shutdown()


def test_pool_is_sized_to_the_cluster(ray_cluster):
    assert RayExecutor().pool_size(items=10) == 2  # 2 CPUs, 1 per worker
    assert RayExecutor(cpus_per_worker=0.5).pool_size(items=3) == 3  # 4 fit; 3 items
    assert RayExecutor(cpus_per_worker=2).pool_size(items=10) == 1
    with pytest.warns(UserWarning, match="3 workers x 1 CPUs / 0 GPUs do not fit the cluster"):
        assert RayExecutor(num_workers=3).pool_size(items=10) == 3
    with pytest.warns(UserWarning, match="only 0 run at a time"):
        RayExecutor(gpus_per_worker=1).pool_size(items=10)


def test_ray_and_local_give_identical_runs_for_every_built_in_policy(ray_cluster, local_exp, heads_file, tmp_path):
    assert set(BUILT_IN_POLICIES) == set(local_exp.registry.names("exit_policy"))  # a new built-in joins this test
    policies = list(BUILT_IN_POLICIES.items())
    with one_thread():
        local = local_exp.run_many(policies)
    # its own hidden-state cache: calibrating "calibrated" collects the valid states on the pool too
    exp = ray_experiment(heads_file, tmp_path / "hidden", num_workers=2)
    store = Store.open(tmp_path / "runs.duckdb")
    with one_thread():  # the driver's share (head outputs for calibration) as the local run did it
        remote = exp.run_many(policies, store=store)
    assert len(list((tmp_path / "hidden").glob("*.npy"))) == 1
    np.testing.assert_array_equal(exp.features("valid", TINY["valid_requests"])[0],
                                  local_exp.features("valid", TINY["valid_requests"])[0])  # fmt: skip
    for here, there in zip(local, remote, strict=True):
        assert [p.request_id for p in here.predictions] == [p.request_id for p in there.predictions]
        assert [p.exit_layer for p in here.predictions] == [p.exit_layer for p in there.predictions], here.label
        assert [p.prob for p in here.predictions] == [p.prob for p in there.predictions], here.label
        assert [p.layer_probs for p in here.predictions] == [p.layer_probs for p in there.predictions]
        assert here.metrics["auc"] == there.metrics["auc"]
        stored = store.query("SELECT count(*) AS n, count(DISTINCT request_id) AS distinct_ids FROM predictions "
                             "WHERE run_id = ?", [there.run_id])  # fmt: skip
        assert stored.iloc[0].tolist() == [48, 48]
        assert store.run(there.run_id)["status"] == "finished"
    assert len({tuple(p.exit_layer for p in r.predictions) for r in local}) > 2  # the policies really differ


def test_workers_that_raise_or_die_once_are_retried_and_each_request_is_stored_once(ray_cluster, heads_file,
                                                                                    hidden_dir, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    raised, died = tmp_path / "raised-once", tmp_path / "died-once"
    monkeypatch.setenv(FAULT_VARIABLE, f"1:raise-once:{raised},3:exit-once:{died}")  # os._exit in mid-batch
    exp = ray_experiment(heads_file, hidden_dir, num_workers=1)
    store = Store.open(tmp_path / "runs.duckdb")
    result = exp.run("max-prob", {"threshold": 0.6}, store=store, requests=exp.requests(limit=40))
    assert raised.exists() and died.exists()  # both batches really failed once
    counts = store.query("SELECT count(*), count(DISTINCT request_id) FROM predictions WHERE run_id = ?",
                         [result.run_id])  # fmt: skip
    assert counts.iloc[0].tolist() == [40, 40]
    assert store.query("SELECT count(*) FROM layer_outputs WHERE run_id = ?", [result.run_id]).iloc[0, 0] == sum(
        len(p.layer_probs) for p in result.predictions)  # fmt: skip
    assert store.run(result.run_id)["status"] == "finished"


def test_a_worker_that_always_fails_marks_the_run_failed_with_the_cause(ray_cluster, heads_file, hidden_dir,
                                                                        tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv(FAULT_VARIABLE, f"1:raise-always:{tmp_path / 'unused'}")
    exp = ray_experiment(heads_file, hidden_dir, num_workers=1)
    store = Store.open(tmp_path / "runs.duckdb")
    started = time.perf_counter()
    with pytest.raises(ExecutorError, match=r"Ray run failed after \d/3 items: .*injected failure on batch 1"):
        exp.run("never", store=store, requests=exp.requests(limit=24))
    assert time.perf_counter() - started < 300  # 1 + 3 retries, not Ray Data's endless default
    runs = store.runs(include_failed=True)
    assert runs["status"].tolist() == ["failed"]
    assert "injected failure on batch 1" in store.run(runs["run_id"].iloc[0])["error"]
