"""The mhee-llamaindex plugin: registration, the retriever contract, the time rule, the adapter, ranking."""

from __future__ import annotations

import json
import subprocess
import sys

import mhee_llamaindex.plugin as llamaindex_plugin
import pandas as pd
import pytest
import torch
from llama_index.core.schema import TextNode
from llama_index.retrievers.bm25 import BM25Retriever
from mhee_llamaindex import (
    BM25HistoryRetriever,
    LlamaIndexRetriever,
    MissingMetadataError,
    VectorHistoryRetriever,
    interaction_nodes,
)
from mhee_llamaindex.nodes import item_texts
from mhee_llamaindex.vector import LAST_TS

from mhee_sdk.data.log import InteractionLog
from mhee_sdk.registry import Registry
from mhee_sdk.testing import check_retriever
from mhee_sdk.types import Request

NAMES = ("llamaindex-bm25", "llamaindex-vector", "llamaindex-adapter")


@pytest.fixture(scope="module")
def vector(movielens) -> VectorHistoryRetriever:
    """One instance for the module: fit embeds the catalogue once and later fits reuse the vectors."""
    threads = torch.get_num_threads()
    # on 2 shared cores one torch thread embeds the 1,682 items 2-3x faster than two contending ones
    torch.set_num_threads(1)
    try:
        return VectorHistoryRetriever().fit(movielens.load().split("train"), movielens.log)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def title_to_item(movielens) -> dict[str, int]:
    items = movielens.load().items
    return dict(zip(items["title"], items["item"].astype(int), strict=True))


def sample(movielens, n: int = 100) -> list[Request]:
    return [*movielens.requests("valid", limit=n, seed=3), *movielens.requests("test", limit=n, seed=3)]


def test_registered_through_the_llamaindex_entry_point_without_importing_llamaindex():
    registry = Registry()
    assert set(NAMES) <= set(registry.names("retriever"))
    for name in NAMES:
        entry, _ = registry.get("retriever", name)
        assert (entry.plugin, entry.version) == ("llamaindex", "0.1.0")
    # `python -m mhee_sdk.cli plugins --json`, then: loading the plugin must not import LlamaIndex (seconds)
    code = (
        "import runpy, sys; sys.argv = ['mhee', 'plugins', '--json']\n"
        "try: runpy.run_module('mhee_sdk.cli', run_name='__main__')\n"
        "finally: print('llama_index' in sys.modules, file=sys.stderr)"
    )
    cli = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == "False"
    rows = {row["name"]: row for row in json.loads(cli.stdout)["entries"] if row["kind"] == "retriever"}
    assert all(rows[name]["plugin"] == "llamaindex" for name in NAMES)


def test_unknown_parameter_names_the_choices():
    with pytest.raises(TypeError, match=r"'llamaindex-bm25' has no parameter 'top_k'; choose from: items, cache_size"):
        Registry().create("retriever", "llamaindex-bm25", top_k=3)
    with pytest.raises(TypeError, match="retriever 'llamaindex-adapter' needs parameter"):
        Registry().create("retriever", "llamaindex-adapter")
    with pytest.raises(RuntimeError, match="BM25HistoryRetriever is not fitted"):
        BM25HistoryRetriever().retrieve([Request(0, 1, 1, 1, 10)], 3)
    with pytest.raises(TypeError, match="must be a LlamaIndex BaseRetriever"):
        LlamaIndexRetriever(retriever=object())
    with pytest.raises(ValueError, match="items lacks column"):
        BM25HistoryRetriever(items=pd.DataFrame({"item": [1]}))


def test_bm25_keeps_the_contract(movielens):
    check_retriever(BM25HistoryRetriever(), movielens, k=5)


def test_vector_keeps_the_contract(vector, movielens):
    check_retriever(vector, movielens, k=5)


@pytest.mark.parametrize("kind", ["bm25", "vector"])
def test_no_leakage_on_valid_and_test_requests(kind, movielens, vector):
    retriever = BM25HistoryRetriever().fit(movielens.load().split("train"), movielens.log) if kind == "bm25" else vector
    requests = sample(movielens)
    results = retriever.retrieve(requests, 10)
    assert sum(map(len, results)) > 5 * len(requests)
    for request, found in zip(requests, results, strict=True):
        # the request's own rating sits in the log at ts == request.ts and would be the best match
        assert all(r.ts < request.ts and r.user == request.user and r.item != request.item for r in found)


def test_bm25_index_is_exactly_the_history_before_the_request(movielens):
    """Cached per-prefix indexes give what a fresh BM25 over log.before(user, ts) gives (same IDF)."""
    requests = [r for r in movielens.requests("test") if r.user == 13][:6]
    shared = BM25HistoryRetriever().fit(movielens.load().split("train"), movielens.log)
    batched = shared.retrieve(requests, 4)
    text = shared.item_text
    for request, found in zip(requests, batched, strict=True):
        history = movielens.log.before(request.user, request.ts)
        fresh = BM25Retriever(nodes=interaction_nodes(history, text), similarity_top_k=4).retrieve(text(request.item))
        fresh = [hit for hit in fresh if hit.score > 0]
        assert [round(r.score, 5) for r in found] == [round(hit.score, 5) for hit in fresh]
        # ties at the cut may pick different items; everything above it must match
        cut = found[-1].score if found else 0
        above = {hit.node.metadata["item"] for hit in fresh if hit.score > cut + 1e-6}
        assert above == {r.item for r in found if r.score > cut + 1e-6}


def test_vector_ranks_related_movies_first(vector, movielens, title_to_item):
    """For Star Wars, sci-fi history beats comedies; a later Return of the Jedi rating stays invisible."""
    history = ["Sleepless in Seattle", "Alien", "Mrs. Doubtfire", "Empire Strikes Back, The", "Babe"]
    items = [title_to_item[t] for t in [*history, "Return of the Jedi"]]
    log = InteractionLog(pd.DataFrame({"user": 1, "item": items, "rating": 4.0, "ts": [1, 2, 3, 4, 5, 100]}))
    vector.fit(pd.DataFrame(), log)
    try:
        [found] = vector.retrieve([Request(0, 1, title_to_item["Star Wars"], 1, 50)], 5)
    finally:
        vector.fit(movielens.load().split("train"), movielens.log)
    ranked = [movielens.load().items.set_index("item").loc[r.item, "title"] for r in found]
    assert ranked[:2] == ["Empire Strikes Back, The", "Alien"], ranked
    assert len(ranked) == 5 and found[0].why.startswith("cos ")


def test_adapter_drops_later_and_other_users_nodes(movielens, title_to_item, registry):
    text = item_texts(movielens.load().items)

    def node(title: str, user: int, ts: int) -> TextNode:
        item = title_to_item[title]
        return TextNode(text=text(item), id_=title, metadata={"item": item, "user": user, "rating": 5, "ts": ts})

    nodes = [
        node("Empire Strikes Back, The", 1, 10),
        node("Return of the Jedi", 1, 500),  # after the request: must be dropped
        node("Star Trek: The Wrath of Khan", 2, 10),  # another user's
        node("Babe", 1, 20),
    ]
    request = Request(0, 1, title_to_item["Star Wars"], 1, 100)
    train = movielens.load().split("train")
    registry.add_plugin(llamaindex_plugin, "llamaindex")
    wrapped = registry.create("retriever", "llamaindex-adapter", retriever=BM25Retriever(nodes, similarity_top_k=4))
    assert isinstance(wrapped, LlamaIndexRetriever)
    wrapped.fit(train, movielens.log)
    [found] = wrapped.retrieve([request], 5)
    assert [r.item for r in found] == [title_to_item["Empire Strikes Back, The"], title_to_item["Babe"]]
    assert found[0].rating == 5.0 and found[0].score > found[1].score and found[0].why.startswith("llamaindex ")
    everyone = LlamaIndexRetriever(BM25Retriever(nodes=nodes, similarity_top_k=4), same_user=False)
    [found] = everyone.fit(train, movielens.log).retrieve([request], 5)
    assert {r.user for r in found} == {1, 2} and all(r.ts < request.ts for r in found)

    bare = [TextNode(text="Star Wars sequel", id_="no-ts", metadata={"item": 172, "user": 1})]
    broken = LlamaIndexRetriever(BM25Retriever(nodes=bare, similarity_top_k=1)).fit(train, movielens.log)
    with pytest.raises(MissingMetadataError, match=r"node 'no-ts' has no metadata key 'rating'"):
        broken.retrieve([request], 3)


def test_adapter_keeps_the_contract_over_movielens_history_nodes(movielens):
    """A user-built BM25 over whole timelines (later ratings included) of the requests' users."""
    requests = [*movielens.requests("train", limit=20, seed=1), *movielens.requests("test", limit=30, seed=1)]
    text = item_texts(movielens.load().items)
    nodes = [
        n for u in sorted({r.user for r in requests}) for n in interaction_nodes(movielens.log.before(u, LAST_TS), text)
    ]
    wrapped = LlamaIndexRetriever(BM25Retriever(nodes=nodes, similarity_top_k=200))
    check_retriever(wrapped, movielens, k=5, requests=requests)
    results = wrapped.retrieve(requests, 5)
    assert sum(map(len, results)) > len(requests)
    assert all(r.user == q.user and r.ts < q.ts for q, found in zip(requests, results, strict=True) for r in found)


def test_adapter_resolves_item_nodes_through_the_log(movielens):
    """A catalogue index (item ids only): hits become the user's earlier ratings of those items."""
    items = movielens.load().items
    text = item_texts(items)
    catalogue = [TextNode(text=text(int(i)), id_=f"item-{i}", metadata={"item": int(i)}) for i in items["item"]]
    wrapped = LlamaIndexRetriever(
        BM25Retriever(nodes=catalogue, similarity_top_k=300), user_key=None, rating_key=None, ts_key=None
    )
    check_retriever(wrapped, movielens, k=5)
    [request] = movielens.requests("test", limit=1, seed=4)
    [found] = wrapped.retrieve([request], 5)
    earlier = movielens.log.before(request.user, request.ts)
    rated = dict(
        zip(earlier.item.tolist(), zip(earlier.rating.tolist(), earlier.ts.tolist(), strict=True), strict=True)
    )
    assert found and all(rated[r.item] == (r.rating, r.ts) for r in found)


def test_a_run_holding_a_live_llamaindex_retriever_is_stored(movielens, tmp_path):
    """The adapter's documented form: the user's own retriever object in retriever_params."""
    from mhee_sdk.config import RunConfig
    from mhee_sdk.evaluation import Experiment
    from mhee_sdk.store import Store

    items = movielens.load().items
    text = item_texts(items)
    catalogue = [TextNode(text=text(int(i)), id_=f"item-{i}", metadata={"item": int(i)}) for i in items["item"]]
    live = BM25Retriever(nodes=catalogue, similarity_top_k=50)
    registry = Registry(load_entry_points=False)
    registry.add_plugin(llamaindex_plugin, "llamaindex")
    config = RunConfig(backbone="tiny", retriever="llamaindex-adapter", head="verbalizer", exit_layers=[3, 6],
                       retriever_params={"retriever": live, "user_key": None, "rating_key": None, "ts_key": None},
                       k=3, prompt_tokens=400, eval_requests=8, batch_size=4)  # fmt: skip
    store = Store.open(tmp_path / "runs.duckdb")
    result = Experiment(config, registry=registry, progress=False, cache_dir=tmp_path).run("never", store=store)
    record = store.run(result.run_id)
    assert record["status"] == "finished" and len(store.predictions(result.run_id)) == 8
    described = record["config"]["retriever_params"]["retriever"]
    assert described["__object__"].endswith("BM25Retriever") and record["config"]["reproducible"] is False
    assert record["config"]["retriever_params"]["user_key"] is None  # plain values stay plain
