"""Every extension point of mhee-sdk, one hook each.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names match the
hooks below. Each hook receives a ``register`` callback: call ``register(name, factory)`` once per
thing you provide. ``factory(**params)`` must build a fresh instance from keyword arguments only
(the values a run config gives), so a run can be described as plain data.

Ship a plugin as an ordinary package with an entry point in the ``mhee_sdk`` group::

    [project.entry-points.mhee_sdk]
    my_plugin = "my_package.plugin"

A name that ends with ``:`` registers a family: ``register("hf:", factory)`` makes
``"hf:HuggingFaceTB/SmolLM2-360M"`` build ``factory(spec="HuggingFaceTB/SmolLM2-360M", **params)``.
Names must be unique per kind across all plugins; a clash is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("mhee_sdk")
hookimpl = HookimplMarker("mhee_sdk")

Register = Callable[..., None]
"""``register(name: str, factory: Callable[..., Any], description: str = "")``."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: ``register("movielens-100k", MovieLens100K)``.

    The factory returns an object with the :class:`mhee_sdk.interfaces.Dataset` protocol:
    ``load()`` returning the interactions, users and items tables, and ``requests(split)``.
    Interactions need the columns ``user, item, rating, ts, label``; requests of the ``valid`` and
    ``test`` splits must be later in time than every ``train`` interaction.
    """


@hookspec
def register_retrievers(register: Register) -> None:
    """Register retrievers: ``register("my-retriever", MyRetriever)``.

    The factory returns an object with the :class:`mhee_sdk.interfaces.Retriever` protocol:
    ``fit(train, log)`` learns from the training interactions only, and
    ``retrieve(requests, k)`` returns, per request, up to ``k`` :class:`mhee_sdk.Retrieved`
    interactions, best first. A retriever must never return an interaction at or after the
    request's timestamp; ``log.before(user, ts)`` gives exactly what is allowed.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbones: ``register("my-llm", MyBackbone)``.

    The factory returns an object with the :class:`mhee_sdk.interfaces.Backbone` protocol: it
    tokenizes a batch of prompts (``start``), runs one decoder layer at a time (``step``), gives the
    last real token's hidden state (``pooled``) and drops finished rows (``select``).
    """


@hookspec
def register_exit_heads(register: Register) -> None:
    """Register exit-head kinds: ``register("my-head", MyHead)``.

    The factory is called as ``factory(hidden_size=..., layer=..., backbone=..., **params)`` and
    returns a ``torch.nn.Module`` mapping pooled hidden states ``[B, H]`` to P(like) ``[B]``.
    Set ``trainable = False`` on heads that need no fitting (the verbalizer does this).
    """


@hookspec
def register_exit_policies(register: Register) -> None:
    """Register exit policies: ``register("my-policy", MyPolicy)``.

    The factory returns an object with the :class:`mhee_sdk.interfaces.ExitPolicy` protocol:
    ``decide(layer, probs)`` gets the 1-based exit layer just evaluated and the matrix
    ``probs[B, j]`` of every head output so far (column ``j - 1`` is this layer's head), and returns
    a bool array ``[B]`` (True = stop here). It must depend on nothing else, so the same code runs live
    and when replaying logged outputs. The engine always stops at the last exit layer.
    """


@hookspec
def register_baselines(register: Register) -> None:
    """Register classic (non-LLM) recommenders to compare against: ``register("my-baseline", MyBaseline)``.

    The factory returns an object with ``fit(train, log)`` (training interactions only, plus the
    strictly-earlier log) and ``score(requests) -> numpy array [N]``, higher meaning more likely liked.
    Scores need not be probabilities: evaluation calibrates them on validation requests. Factories
    receive ``users=`` and ``items=`` tables as keyword arguments when they accept them.
    """
