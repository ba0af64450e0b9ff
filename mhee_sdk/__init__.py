"""mhee-sdk: retrieval-augmented LLM recommenders with multi-head early exit, for notebooks."""

from mhee_sdk.data.interactions import InteractionsDataset
from mhee_sdk.data.log import InteractionLog
from mhee_sdk.data.movielens import MovieLens100K
from mhee_sdk.data.prompt import PromptBuilder, PromptTemplate
from mhee_sdk.hookspecs import hookimpl, hookspec
from mhee_sdk.interfaces import Knob
from mhee_sdk.registry import Registry, create, get_registry
from mhee_sdk.types import Prediction, Request, Retrieved

__all__ = [
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
    "create",
    "get_registry",
    "hookimpl",
    "hookspec",
]
