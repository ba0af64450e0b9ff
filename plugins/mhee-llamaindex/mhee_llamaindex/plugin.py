"""The ``llamaindex`` entry point: registers three retrievers without importing LlamaIndex.

LlamaIndex and torch take seconds to import, and every ``Registry()`` (so ``mhee plugins``) loads this
module; the factories import the implementations only when a retriever is created.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from mhee_sdk.hookspecs import hookimpl

# registered name -> (module, class, description)
RETRIEVERS: dict[str, tuple[str, str, str]] = {
    "llamaindex-bm25": (
        "mhee_llamaindex.bm25",
        "BM25HistoryRetriever",
        "BM25 (LlamaIndex) over the user's earlier interactions, queried with the candidate's text",
    ),
    "llamaindex-vector": (
        "mhee_llamaindex.vector",
        "VectorHistoryRetriever",
        "all-MiniLM-L6-v2 VectorStoreIndex (LlamaIndex) over the user's earlier interactions",
    ),
    "llamaindex-adapter": (
        "mhee_llamaindex.adapter",
        "LlamaIndexRetriever",
        "Wraps any LlamaIndex retriever whose nodes carry item ids (pass retriever=...)",
    ),
}


def factory(name: str) -> Callable[..., Any]:
    """A factory for `name` that imports its class on first call and names unknown parameters."""
    module_name, class_name, _ = RETRIEVERS[name]

    def create(**params: Any) -> Any:
        cls = getattr(importlib.import_module(module_name), class_name)
        signature = inspect.signature(cls).parameters
        allowed = list(signature)
        required = [p for p, spec in signature.items() if spec.default is inspect.Parameter.empty]
        missing = [p for p in required if p not in params]
        if missing:
            raise TypeError(f"retriever {name!r} needs parameter(s) {', '.join(missing)}")
        for param in params:
            if param not in allowed:
                hint = difflib.get_close_matches(param, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise TypeError(
                    f"retriever {name!r} has no parameter {param!r}; choose from: {', '.join(allowed)}{suggestion}"
                )
        return cls(**params)

    create.__doc__ = RETRIEVERS[name][2]
    return create


@hookimpl
def register_retrievers(register) -> None:
    for name, (_, _, description) in RETRIEVERS.items():
        register(name, factory(name), description)
