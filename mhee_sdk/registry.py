"""Finds plugins (built-in modules and ``mhee_sdk`` entry points) and looks things up by name.

Built-ins register through the same hooks as third-party packages. Plugins load one at a time:
one that fails to import, or whose hook raises, is skipped with a warning naming it
(``MHEE_STRICT_PLUGINS=1`` raises instead). ``MHEE_PLUGINS=a,b`` loads only those entry points;
``MHEE_DISABLE_PLUGINS=a,b`` switches off any plugin by name, built-ins included.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from importlib.metadata import version as package_version
from typing import Any

import pluggy

from mhee_sdk import hookspecs
from mhee_sdk.types import PluginFailure, PluginInfo
from mhee_sdk.validation import check_params, did_you_mean

ENTRY_POINT_GROUP = "mhee_sdk"

# kind -> hook that registers it
HOOKS: dict[str, str] = {
    "dataset": "register_datasets",
    "retriever": "register_retrievers",
    "backbone": "register_backbones",
    "exit_head": "register_exit_heads",
    "exit_policy": "register_exit_policies",
    "baseline": "register_baselines",
}

DEFAULT_PLUGINS: tuple[str, ...] = (
    "mhee_sdk.data.interactions",
    "mhee_sdk.data.movielens",
    "mhee_sdk.retrievers.simple",
    "mhee_sdk.retrievers.gcn",
    "mhee_sdk.backbones.hf",
    "mhee_sdk.backbones.tiny",
    "mhee_sdk.exits.heads",
    "mhee_sdk.exits.policies",
    "mhee_sdk.baselines",
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]*:?$")


class PluginError(Exception):
    """A plugin could not be loaded, or a lookup failed."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name for the same kind."""


class UnknownNameError(PluginError, ValueError):
    """No plugin registered the requested name."""


class ParameterError(PluginError, TypeError):
    """A factory was given a parameter it does not take, or not one it needs."""


class PluginWarning(UserWarning):
    """A plugin was skipped; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One registered name: what it is, who registered it, and how to build it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    version: str
    description: str = ""

    @property
    def is_family(self) -> bool:
        """True for names like ``hf:`` that take a spec after the colon."""
        return self.name.endswith(":")


def _label(kind: str) -> str:
    return kind.replace("_", " ")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"", "0", "false", "no", "off"}:
        return False
    raise PluginError(f"{name}={os.environ[name]!r} is not a flag; use 1 (on) or 0 (off)")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


class Registry:
    """All plugins and the names they registered.

    Args:
        strict: raise on the first broken plugin instead of warning (default: ``MHEE_STRICT_PLUGINS``).
        allow: entry-point names (or distribution names) to load; None loads all (default:
            ``MHEE_PLUGINS``, comma-separated). Built-ins always load unless disabled.
        disable: plugins to switch off, built-ins included (a built-in's name is its module, e.g.
            ``mhee_sdk.backbones.tiny``; an entry point's is its entry-point or distribution name). Default:
            ``MHEE_DISABLE_PLUGINS``, comma-separated. `mhee plugins` lists the names.
        load_entry_points: set False to load built-ins only.
    """

    def __init__(
        self,
        *,
        strict: bool | None = None,
        allow: Sequence[str] | None = None,
        disable: Sequence[str] | None = None,
        load_entry_points: bool = True,
        builtins: Sequence[str] = DEFAULT_PLUGINS,
    ) -> None:
        self.strict = _env_flag("MHEE_STRICT_PLUGINS") if strict is None else strict
        allow = _env_list("MHEE_PLUGINS") if allow is None else allow
        disable = _env_list("MHEE_DISABLE_PLUGINS") if disable is None else disable
        self.allow = None if allow is None else set(allow)
        self.disable = set(disable or ())
        self.disabled: list[str] = []  # plugins switched off by `disable`
        self.manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.manager.add_hookspecs(hookspecs)
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in HOOKS}
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        sdk_version = package_version("mhee-sdk")
        known: set[str] = set(builtins)
        for module_name in builtins:
            if module_name in self.disable:
                self.disabled.append(module_name)
                continue
            self._load(lambda m=module_name: importlib.import_module(m), module_name, sdk_version, "builtin")
        if load_entry_points:
            known |= self._load_entry_points()
        self._warn_unknown(known, load_entry_points)

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> set[str]:
        """Load the allowed, enabled entry points; returns every name (entry point and distribution) seen."""
        seen: set[str] = set()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            dist_name = ep.dist.name if ep.dist else ""
            seen |= {ep.name, dist_name} - {""}
            if self.allow is not None and ep.name not in self.allow and dist_name not in self.allow:
                continue
            if {ep.name, dist_name} & self.disable:
                self.disabled.append(ep.name)
                continue
            version = ep.dist.version if ep.dist else "?"
            self._load(ep.load, ep.name, version, "entry point")
        return seen

    def _warn_unknown(self, known: set[str], entry_points_loaded: bool) -> None:
        # a misspelled name would otherwise switch everything (or nothing) off without a word
        for setting, names in (("MHEE_PLUGINS / allow", self.allow or set()), ("MHEE_DISABLE_PLUGINS / disable",
                                                                              self.disable)):  # fmt: skip
            if not entry_points_loaded and setting.startswith("MHEE_PLUGINS"):
                continue
            unknown = sorted(names - known)
            if unknown:
                message = f"{setting} names {', '.join(map(repr, unknown))}, which no plugin has; known: " + ", ".join(
                    sorted(known)
                )
                if self.strict:
                    raise PluginError(message)
                warnings.warn(f"mhee_sdk: {message}", PluginWarning, stacklevel=3)

    def add_plugin(self, plugin: object, name: str, version: str = "", source: str = "python") -> None:
        """Register a plugin object (module, class or instance with ``@hookimpl`` functions) directly.

        Handy in a notebook before packaging a plugin; follows the same rules as entry points.
        """
        self._load(lambda: plugin, name, version, source)

    def _load(self, load: Callable[[], object], name: str, version: str, source: str) -> None:
        try:
            plugin = load()
        except Exception as err:  # a plugin's import can raise anything; we report and go on
            self._fail(name, f"import failed: {type(err).__name__}: {err}", err)
            return
        try:
            self.manager.register(plugin, name=name)
            self.manager.check_pending()
        except Exception as err:
            if self.manager.has_plugin(name):
                self.manager.unregister(name=name)
            self._fail(name, f"invalid hooks: {type(err).__name__}: {err}", err)
            return
        staged: list[Entry] = []
        hooks_used: list[str] = []
        try:
            for kind, hook_name in HOOKS.items():
                for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                    if impl.plugin_name != name:
                        continue
                    hooks_used.append(hook_name)
                    offered = {"register": self._stager(kind, name, version, staged)}
                    impl.function(**{arg: offered[arg] for arg in impl.argnames})  # a hookimpl may take a subset
            self._commit(staged)
        except Exception as err:
            self.manager.unregister(name=name)
            self._fail(name, f"{type(err).__name__}: {err}", err)
            return
        self.plugins.append(PluginInfo(name=name, version=version, hooks=tuple(hooks_used), source=source))

    def _stager(self, kind: str, plugin: str, version: str, staged: list[Entry]) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(
                    f"{_label(kind)} name {name!r} is invalid; use lowercase letters, digits and . _ + -"
                    " (a trailing ':' registers a family)"
                )
            if not callable(factory):
                raise TypeError(f"{_label(kind)} {name!r}: factory must be callable, got {factory!r}")
            staged.append(Entry(kind, name, factory, plugin, version, description or _first_line(factory)))

        return register

    def _commit(self, staged: Iterable[Entry]) -> None:
        seen: dict[tuple[str, str], Entry] = {}
        for entry in staged:
            key = (entry.kind, entry.name)
            owner = self.entries[entry.kind].get(entry.name) or seen.get(key)
            if owner is not None:
                raise DuplicateNameError(
                    f"{_label(entry.kind)} {entry.name!r} is registered by both "
                    f"{owner.plugin!r} and {entry.plugin!r}; rename one or switch one off with MHEE_DISABLE_PLUGINS"
                )
            seen[key] = entry
        for entry in seen.values():
            self.entries[entry.kind][entry.name] = entry

    def _fail(self, name: str, message: str, err: Exception) -> None:
        if self.strict:
            raise PluginError(
                f"plugin {name!r} failed: {message}; fix or uninstall it, or switch it off with "
                f"MHEE_DISABLE_PLUGINS={name} (unset MHEE_STRICT_PLUGINS to skip broken plugins with a warning)"
            ) from err
        self.failures.append(PluginFailure(name=name, error=message))
        warnings.warn(
            f"mhee_sdk: skipped plugin {name!r}: {message} (set MHEE_STRICT_PLUGINS=1 to raise)",
            PluginWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ lookup
    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted; families show as ``hf:<spec>``."""
        self._check_kind(kind)
        return sorted(f"{n}<spec>" if e.is_family else n for n, e in self.entries[kind].items())

    def get(self, kind: str, name: str) -> tuple[Entry, dict[str, Any]]:
        """The entry for `name` and the extra factory arguments its name implies (``spec`` for families)."""
        self._check_kind(kind)
        entries = self.entries[kind]
        if name in entries and not entries[name].is_family:
            return entries[name], {}
        for family in sorted((e for e in entries.values() if e.is_family), key=lambda e: -len(e.name)):
            if isinstance(name, str) and name.startswith(family.name) and len(name) > len(family.name):
                return family, {"spec": name[len(family.name) :]}
        choices = self.names(kind)
        suggestion = did_you_mean(name, choices)
        raise UnknownNameError(
            f"{_label(kind)} {name!r} is unknown; choose from: {', '.join(choices) or '(none registered)'}{suggestion}"
        )

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Build the `kind` registered as `name` from keyword `params`.

        Example: ``create("exit_policy", "max-prob", threshold=0.9)``.
        """
        entry, implied = self.get(kind, name)
        # names only: a misspelled parameter gets a did-you-mean instead of a bare TypeError; the factory checks values
        problems = check_params(entry.factory, params, f"{_label(kind)} {name!r}", supplied=implied, types=False)
        if problems:
            raise ParameterError("; ".join(problems))
        return entry.factory(**implied, **params)

    def records(self) -> list[dict[str, str]]:
        """One row per registered name: name, kind, plugin, version, description."""
        return [
            {
                "name": f"{e.name}<spec>" if e.is_family else e.name,
                "kind": kind,
                "plugin": e.plugin,
                "version": e.version,
                "description": e.description,
            }
            for kind in HOOKS
            for e in sorted(self.entries[kind].values(), key=lambda e: e.name)
        ]

    def _check_kind(self, kind: str) -> None:
        if kind not in HOOKS:
            raise ValueError(f"kind {kind!r} is unknown; choose from: {', '.join(HOOKS)}")


def _first_line(obj: object) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use (reads the MHEE_* variables then)."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry so the next `get_registry` reloads plugins."""
    global _default
    _default = None


def create(kind: str, name: str, **params: Any) -> Any:
    """Shortcut for ``get_registry().create(kind, name, **params)``."""
    return get_registry().create(kind, name, **params)
