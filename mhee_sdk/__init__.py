"""mhee-sdk: retrieval-augmented LLM recommenders with multi-head early exit, for notebooks.

The public names load on first use (PEP 562), so ``import mhee_sdk`` and the ``mhee`` command start
without torch or pandas; ``hookimpl`` and ``hookspec`` need only pluggy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mhee_sdk.hookspecs import hookimpl, hookspec

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "ConfigError": "mhee_sdk.validation",
    "Experiment": "mhee_sdk.evaluation",
    "InteractionLog": "mhee_sdk.data.log",
    "InteractionsDataset": "mhee_sdk.data.interactions",
    "Knob": "mhee_sdk.interfaces",
    "MovieLens100K": "mhee_sdk.data.movielens",
    "Prediction": "mhee_sdk.types",
    "PromptBuilder": "mhee_sdk.data.prompt",
    "PromptTemplate": "mhee_sdk.data.prompt",
    "Registry": "mhee_sdk.registry",
    "Request": "mhee_sdk.types",
    "Retrieved": "mhee_sdk.types",
    "RunConfig": "mhee_sdk.config",
    "RunResult": "mhee_sdk.runs",
    "Store": "mhee_sdk.store",
    "create": "mhee_sdk.registry",
    "evaluate": "mhee_sdk.evaluation",
    "get_registry": "mhee_sdk.registry",
}

__all__ = [
    "ConfigError",
    "Experiment",
    "InteractionLog",
    "InteractionsDataset",
    "Knob",
    "MovieLens100K",
    "Prediction",
    "PromptBuilder",
    "PromptTemplate",
    "Registry",
    "Request",
    "Retrieved",
    "RunConfig",
    "RunResult",
    "Store",
    "create",
    "evaluate",
    "get_registry",
    "hookimpl",
    "hookspec",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from mhee_sdk.config import RunConfig
    from mhee_sdk.data.interactions import InteractionsDataset
    from mhee_sdk.data.log import InteractionLog
    from mhee_sdk.data.movielens import MovieLens100K
    from mhee_sdk.data.prompt import PromptBuilder, PromptTemplate
    from mhee_sdk.evaluation import Experiment, evaluate
    from mhee_sdk.interfaces import Knob
    from mhee_sdk.registry import Registry, create, get_registry
    from mhee_sdk.runs import RunResult
    from mhee_sdk.store import Store
    from mhee_sdk.types import Prediction, Request, Retrieved
    from mhee_sdk.validation import ConfigError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mhee_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
