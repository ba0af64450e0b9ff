"""Every extension point of mhee-sdk, one hook each.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names match the
hooks below. Each hook receives a ``register`` callback: call ``register(name, factory)`` once per
thing you provide. ``factory(**params)`` must build a fresh instance from keyword arguments only
(the values a run config gives), so a run can be described as plain data. What each built object
must provide is stated once, in ``mhee_sdk.interfaces``; the docstrings below point there.

Ship a plugin as an ordinary package with an entry point in the ``mhee_sdk`` group:

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

    The factory builds a [`Dataset`][mhee_sdk.interfaces.Dataset] (optionally a
    [`TemplatedDataset`][mhee_sdk.interfaces.TemplatedDataset] with its prompt wording). Valid and test
    requests must be later in time than every train interaction. Most logs need no plugin: the built-in
    ``interactions`` dataset reads a file or query through a column mapping.
    """


@hookspec
def register_retrievers(register: Register) -> None:
    """Register retrievers: ``register("my-retriever", MyRetriever)``.

    The factory builds a [`Retriever`][mhee_sdk.interfaces.Retriever]; give it
    [`ItemEmbeddings`][mhee_sdk.interfaces.ItemEmbeddings] too if collaborative features should use its item vectors.
    Nothing retrieved may be at or after the request's timestamp (``log.before(user, ts)`` is what is allowed).
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbones: ``register("my-llm", MyBackbone)``.

    The factory builds a [`Backbone`][mhee_sdk.interfaces.Backbone]; optional capabilities (adapters,
    fine-tuning, an LM head for the verbalizer) are the small Protocols next to it.
    ``mhee_sdk.testing.check_backbone`` checks one.
    """


@hookspec
def register_exit_heads(register: Register) -> None:
    """Register exit-head kinds: ``register("my-head", MyHead)``.

    The factory is called as ``factory(hidden_size=..., layer=..., backbone=..., **params)`` and builds a
    ``torch.nn.Module`` following [`ExitHead`][mhee_sdk.interfaces.ExitHead] (optionally
    [`FitsInputs`][mhee_sdk.interfaces.FitsInputs]). ``mhee_sdk.testing.check_exit_head`` checks one.
    """


@hookspec
def register_exit_policies(register: Register) -> None:
    """Register exit policies: ``register("my-policy", MyPolicy)``.

    The factory builds an [`ExitPolicy`][mhee_sdk.interfaces.ExitPolicy]; declare ``knobs``
    ([`TunablePolicy`][mhee_sdk.interfaces.TunablePolicy]) to get sliders in ``PolicyTuner`` and
    ``confidence_levels`` ([`ThresholdPolicy`][mhee_sdk.interfaces.ThresholdPolicy]) to get threshold lines in
    ``ExitExplorer``. ``mhee_sdk.testing.check_exit_policy`` checks one.
    """


@hookspec
def register_baselines(register: Register) -> None:
    """Register classic (non-LLM) recommenders to compare against: ``register("my-baseline", MyBaseline)``.

    The factory builds a [`Baseline`][mhee_sdk.interfaces.Baseline]; scores need not be probabilities
    (evaluation calibrates them on validation requests). ``mhee_sdk.testing.check_baseline`` checks one.
    """
