"""BM25 over the user's earlier interactions, with LlamaIndex's ``BM25Retriever`` (bm25s + PyStemmer).

Time rule: BM25 scores depend on the whole corpus (IDF, average length), so an index over the user's
full timeline, filtered afterwards, would let later ratings shift earlier scores. Each request gets
an index over exactly ``log.before(user, ts)``; indexes are cached by (user, history length), which
identifies that prefix, so requests of one user at the same moment share one.
"""

from __future__ import annotations

from collections import OrderedDict

import pandas as pd
from llama_index.retrievers.bm25 import BM25Retriever

from mhee_llamaindex.history import HistoryRetriever
from mhee_llamaindex.nodes import interaction_nodes
from mhee_sdk.data.log import Events
from mhee_sdk.types import Request, Retrieved


class BM25HistoryRetriever(HistoryRetriever):
    """BM25 (LlamaIndex) over the user's earlier interactions, queried with the candidate's text.

    Args:
        items: item, title, year, genres (default: MovieLens-100K's).
        cache_size: how many per-(user, history) indexes to keep (least recently used go first).
        language: stop-word language passed to ``BM25Retriever``.

    Interactions sharing no term with the candidate (score 0) are not returned, so a request can get
    fewer than `k`.
    """

    name = "llamaindex-bm25"

    def __init__(self, items: pd.DataFrame | None = None, cache_size: int = 512, language: str = "en") -> None:
        super().__init__(items)
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size={cache_size!r} must be a positive integer")
        self.cache_size = cache_size
        self.language = language
        self._indexes: OrderedDict[tuple[int, int], BM25Retriever] = OrderedDict()

    def _reset(self) -> None:
        self._indexes.clear()

    def _index(self, user: int, history: Events) -> BM25Retriever:
        key = (user, history.size)  # log.before returns a prefix of the user's timeline
        if key in self._indexes:
            self._indexes.move_to_end(key)
            return self._indexes[key]
        index = BM25Retriever(
            nodes=interaction_nodes(history, self.item_text), similarity_top_k=1, language=self.language
        )
        self._indexes[key] = index
        if len(self._indexes) > self.cache_size:
            self._indexes.popitem(last=False)
        return index

    def _search(self, request: Request, history: Events, k: int) -> list[Retrieved]:
        index = self._index(request.user, history)
        index.similarity_top_k = min(k, history.size)  # bm25s rejects k above the corpus size
        hits = index.retrieve(self.item_text(request.item))
        return [self.to_retrieved(hit, f"bm25 {hit.score:.2f}") for hit in hits if (hit.score or 0.0) > 0]
