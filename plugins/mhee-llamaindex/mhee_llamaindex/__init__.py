"""mhee-llamaindex: LlamaIndex retrievers for mhee-sdk, and an adapter for any LlamaIndex retriever.

Names are imported on first use (PEP 562), so loading the plugin does not import LlamaIndex.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhee_llamaindex.adapter import LlamaIndexRetriever
    from mhee_llamaindex.bm25 import BM25HistoryRetriever
    from mhee_llamaindex.nodes import MissingMetadataError, interaction_nodes
    from mhee_llamaindex.vector import VectorHistoryRetriever, minilm_embedding

_EXPORTS = {
    "LlamaIndexRetriever": "mhee_llamaindex.adapter",
    "BM25HistoryRetriever": "mhee_llamaindex.bm25",
    "VectorHistoryRetriever": "mhee_llamaindex.vector",
    "minilm_embedding": "mhee_llamaindex.vector",
    "MissingMetadataError": "mhee_llamaindex.nodes",
    "interaction_nodes": "mhee_llamaindex.nodes",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mhee_llamaindex' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = [
    "BM25HistoryRetriever",
    "LlamaIndexRetriever",
    "MissingMetadataError",
    "VectorHistoryRetriever",
    "interaction_nodes",
    "minilm_embedding",
]
