"""Checks a run config and plugin parameters before any work, and says what to type instead.

One pass finds every problem (unknown keys and parameters with a did-you-mean, wrong types, unknown
plugin names, policy parameters the policy itself rejects, exit layers the backbone does not have), so
a user fixes a config once instead of once per minute-long attempt. Types come from annotations:
the dataclass fields of the config, the signatures of plugin factories (``inspect.signature`` at this
one boundary). Only simple annotations are enforced (int, float, bool, str, None, list/tuple/Sequence
of those, dict); anything else is accepted as is, and a factory taking ``**kwargs`` accepts any name.
Nothing here imports torch, pandas or the registry until plugins are checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhee_sdk.config import RunConfig
    from mhee_sdk.registry import Registry


class ConfigError(ValueError):
    """A run config (or plugin parameters) has problems; ``problems`` lists each one with its fix."""

    def __init__(self, problems: Iterable[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = f"{where}{self.problems[0]}"
        else:
            numbered = "; ".join(f"({n}) {p}" for n, p in enumerate(self.problems, 1))
            text = f"{where}{len(self.problems)} problems: {numbered}"
        super().__init__(text)


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `choices`, or an empty string."""
    found = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


# --------------------------------------------------------------------------- values against annotations
_BASES = {"int", "float", "bool", "str", "None", "NoneType", "list", "tuple", "Sequence", "dict", "Mapping", "Any"}
_SEQUENCES = {"list", "tuple", "Sequence"}


def _split_top(text: str, separator: str) -> list[str]:
    """Split at `separator` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if char == separator and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _alternatives(annotation: str) -> list[tuple[str, list[str]]] | None:
    """``"list[int] | None"`` -> ``[("list", ["int"]), ("None", [])]``; None when some part is not simple."""
    text = re.sub(r"\b(typing|collections\.abc)\.", "", annotation.strip().strip("'\""))
    out: list[tuple[str, list[str]]] = []
    for part in _split_top(text, "|"):
        match = re.fullmatch(r"(\w+)(?:\[(.*)\])?", part)
        if match is None:
            return None
        base, args = match.group(1), _split_top(match.group(2) or "", ",")
        if base == "Optional":
            inner = _alternatives(args[0]) if args else None
            if inner is None:
                return None
            out += [*inner, ("None", [])]
        elif base == "Union":
            for arg in args:
                inner = _alternatives(arg)
                if inner is None:
                    return None
                out += inner
        elif base in _BASES:
            out.append((base, args))
        else:
            return None  # a class of its own (a live object, a Protocol...): accepted as is
    return out


def _is_bool(value: object) -> bool:
    return type(value).__name__ in {"bool", "bool_"}  # numpy's bool_ is not an int subclass either


def _matches(value: object, base: str, args: list[str]) -> bool:
    if base == "Any":
        return True
    if base in {"None", "NoneType"}:
        return value is None
    if base == "bool":
        return _is_bool(value)
    if base == "int":
        return isinstance(value, numbers.Integral) and not _is_bool(value)
    if base == "float":
        return isinstance(value, numbers.Real) and not _is_bool(value)
    if base == "str":
        return isinstance(value, str)
    if base in {"dict", "Mapping"}:
        return isinstance(value, Mapping)  # keys and values are the factory's business (stored keys are text)
    if base in _SEQUENCES:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            return False
        if not args:
            return True
        if base == "tuple" and args[-1] != "..." and len(args) != len(value):
            return False
        element_types = [args[0]] * len(value) if base != "tuple" or args[-1] == "..." else args
        for element, annotation in zip(value, element_types, strict=True):
            inner = _alternatives(annotation)
            if inner is not None and not any(_matches(element, b, a) for b, a in inner):
                return False
        return True
    return True


_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "dict": "a table", "Mapping": "a table"}  # fmt: skip


def _describe(base: str, args: list[str]) -> str:
    if base in _SEQUENCES:
        if not args:
            return "a list"
        if base == "tuple" and args[-1] != "...":
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}"
    return _WORDS.get(base, base)


def _plural(annotation: str) -> str:
    return {"int": "integers", "float": "numbers", "str": "strings", "bool": "booleans"}.get(annotation, annotation)


def value_problem(value: object, annotation: object, label: str) -> str | None:
    """Why `value` does not fit `annotation` (``label=value must be ...``), or None when it fits or cannot be checked.

    Bools are not integers, integers are integers (``1.0`` and ``1e9`` are not) and numbers are not strings
    (``"0.8"`` is not one).
    """
    if annotation is inspect.Parameter.empty or annotation is None:
        return None
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    alternatives = _alternatives(text)
    if alternatives is None or any(_matches(value, base, args) for base, args in alternatives):
        return None
    expected = " or ".join(dict.fromkeys(_describe(b, a) for b, a in alternatives if b not in {"None", "NoneType"}))
    shown = _show(value)
    if isinstance(value, str) and any(b in {"int", "float"} for b, _ in alternatives):
        return f"{label}={shown} must be {expected}, not a string (drop the quotes)"
    if isinstance(value, str) and any(b in _SEQUENCES for b, _ in alternatives):
        example = "[" + ", ".join(re.split(r"[,\s]+", value.strip())) + "]" if value.strip() else "[]"
        return f"{label}={shown} must be {expected}, not a string (write {label} = {example})"
    if _is_bool(value) and any(b in {"int", "float"} for b, _ in alternatives):
        return f"{label}={shown} must be {expected}, not true/false"
    if isinstance(value, float) and any(b == "int" for b, _ in alternatives):
        return f"{label}={shown} must be {expected} (no decimal point or exponent)"
    return f"{label}={shown} must be {expected}"


def _show(value: object) -> str:
    if _is_bool(value):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) >= 1e6:
        return f"{value:g}"
    return repr(value)


# --------------------------------------------------------------------------- dataclasses and factories
def field_problems(cls: type, values: Mapping[str, Any], what: str = "config") -> list[str]:
    """Unknown keys (with a did-you-mean) and values that do not fit the annotated types of dataclass `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = []
    for key in values:
        if key not in fields:
            hint = did_you_mean(key, fields)
            problems.append(f"unknown {what} key {key!r}" + (hint or f"; known keys: {', '.join(fields)}"))
    for key, value in values.items():
        if key in fields:
            problem = value_problem(value, fields[key].type, key)
            if problem:
                problems.append(problem)
    return problems


def parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """A factory's keyword parameters and whether it takes ``**kwargs``; None when it has no signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C types have none: nothing to check
        return None
    named = {
        name: p for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }  # fmt: skip
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def check_params(
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    what: str,
    supplied: Iterable[str] = (),
    types: bool = True,
) -> list[str]:
    """Problems of calling ``factory(**supplied, **params)``: unknown names (did-you-mean), missing required ones,
    and (with `types`) values that do not fit their annotations. `supplied`: names the core passes itself.
    """
    found = parameters(factory)
    if found is None:
        return []
    named, takes_any = found
    supplied = set(supplied)
    problems = []
    choices = [name for name in named if name not in supplied]
    for key, value in params.items():
        if key in supplied:
            problems.append(f"{what}: {key!r} is set by mhee itself; remove it")
        elif key not in named:
            if not takes_any:
                hint = did_you_mean(key, choices) or f"; its parameters: {', '.join(choices) or 'none'}"
                problems.append(f"{what} has no parameter {key!r}{hint}")
        elif types:
            problem = value_problem(value, named[key].annotation, key)
            if problem:
                problems.append(f"{what}: {problem}")
    for name, parameter in named.items():
        if parameter.default is inspect.Parameter.empty and name not in params and name not in supplied:
            problems.append(f"{what} needs the parameter {name!r}")
    return problems


# --------------------------------------------------------------------------- a whole run config
# (kind in the registry, config key of its name, config key of its parameters, names the core passes itself)
PLUGIN_KEYS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("dataset", "dataset", "dataset_params", ()),
    ("retriever", "retriever", "retriever_params", ()),
    ("backbone", "backbone", "backbone_params", ()),
    ("exit_head", "head", "head_params", ("hidden_size", "layer", "backbone")),
    ("exit_policy", "policy", "policy_params", ()),
)


def validate_config(
    config: RunConfig | Mapping[str, Any], registry: Registry | None = None, num_layers: int | None = None
) -> list[str]:
    """Every problem of a run config, checked before any data or model loads (empty when it is fine).

    Keys and value types, plugin names (did-you-mean) and each plugin's parameters against its factory;
    the policy is built (cheap) so its own range checks run; exit layers and layer-valued policy knobs
    (``fixed-layer``'s ``layer``) are checked against the backbone's depth when it is known without
    loading it (`num_layers`, a ``num_layers`` parameter, or the ``config.json`` of the folder it loads
    from), else against the config's `exit_layers`.
    """
    from mhee_sdk.config import RunConfig, config_problems
    from mhee_sdk.registry import UnknownNameError, get_registry

    given = dict(config) if isinstance(config, Mapping) else {f.name: getattr(config, f.name)
                                                              for f in dataclasses.fields(RunConfig)}  # fmt: skip
    problems = config_problems(given)
    values = {**_defaults(RunConfig), **given}
    registry = registry or get_registry()
    entries: dict[str, Any] = {}
    for kind, name_key, params_key, supplied in PLUGIN_KEYS:
        name, params = values[name_key], values[params_key]
        if not isinstance(name, str) or not isinstance(params, Mapping):
            continue  # already reported as a type problem
        try:
            entry, implied = registry.get(kind, name)
        except UnknownNameError as err:
            problems.append(str(err))
            continue
        found = check_params(entry.factory, params, f"{params_key} of {_label(kind)} {name!r}",
                             supplied=(*supplied, *implied))  # fmt: skip
        problems += found
        entries[kind] = (entry, implied, params, not found)
    problems += _depth_problems(values, registry, entries, num_layers)
    return problems


def check_config(
    config: RunConfig | Mapping[str, Any],
    registry: Registry | None = None,
    source: str = "",
    num_layers: int | None = None,
) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`validate_config` finds."""
    problems = validate_config(config, registry, num_layers)
    if problems:
        raise ConfigError(problems, source)


def _defaults(cls: type) -> dict[str, Any]:
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls) if f.init
    }  # fmt: skip


def _label(kind: str) -> str:
    return kind.replace("_", " ")


def _depth_problems(values: Mapping[str, Any], registry: Registry, entries: dict[str, Any], num_layers: int | None):
    """Exit layers beyond the backbone, the policy's own checks, and layer-valued knobs beyond the deepest exit."""
    from mhee_sdk.interfaces import TunablePolicy

    problems: list[str] = []
    backbone = values["backbone"]
    if num_layers is None and "backbone" in entries:
        entry, implied, params, _ = entries["backbone"]
        num_layers = backbone_depth(entry.factory, {**implied, **params})
    layers = values.get("exit_layers")
    if layers is not None and value_problem(layers, "list[int]", "exit_layers"):
        layers = None  # reported as a type problem
    elif layers is not None:
        layers = sorted({int(x) for x in layers})
        if not layers:
            problems.append("exit_layers is empty; list at least one layer, or omit it for the default")
        elif layers[0] < 1:
            problems.append(f"exit_layers {layers} must be layer numbers from 1 (1 = after the first layer)")
        elif num_layers is not None and layers[-1] > num_layers:
            problems.append(
                f"exit_layers {layers} must lie within 1..{num_layers}, the layers of backbone {backbone!r}"
            )
    elif num_layers is not None:
        from mhee_sdk.exits.heads import default_exit_layers  # torch is loaded already: the registry imported it

        layers = default_exit_layers(num_layers)
    if "exit_policy" not in entries:
        return problems
    entry, implied, params, params_ok = entries["exit_policy"]
    if not params_ok:
        return problems  # the policy's own checks would only repeat them
    try:
        policy = entry.factory(**implied, **params)
    except Exception as err:  # a policy's constructor can reject its parameters with anything
        return [*problems, f"policy_params of exit policy {entry.name!r}: {err}"]
    if layers and isinstance(policy, TunablePolicy):
        deepest = layers[-1]
        named = (parameters(entry.factory) or ({}, False))[0]
        for knob in policy.knobs:
            default = named[knob.name].default if knob.name in named else knob.default
            value = params.get(knob.name, default)
            if knob.exit_layers and isinstance(value, numbers.Real) and not 1 <= value <= deepest:
                problems.append(
                    f"policy_params of exit policy {entry.name!r}: {knob.name}={value!r} is beyond the deepest exit "
                    f"layer {deepest} of backbone {backbone!r} (it would never exit early); choose one of "
                    f"{', '.join(map(str, layers))}"
                )
    return problems


def backbone_depth(factory: Callable[..., Any], params: Mapping[str, Any]) -> int | None:
    """The backbone's layer count without loading it, when that is cheap; else None.

    From a ``num_layers`` parameter (given, or its default), or the ``config.json`` of the folder the
    factory loads: a local ``hf:<folder>``, a model in the local Hugging Face cache, or the installed
    SmolLM2 asset for the built-in ``smollm2-135m`` factories.
    """
    found = parameters(factory)
    if found is not None:
        named, _ = found
        if "num_layers" in named:
            value = params.get("num_layers", named["num_layers"].default)
            return int(value) if isinstance(value, numbers.Integral) and not _is_bool(value) else None
    for folder in _model_folders(factory, params):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        depth = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
        if isinstance(depth, int):
            return depth
    return None


def _model_folders(factory: Callable[..., Any], params: Mapping[str, Any]) -> list[Path]:
    from mhee_sdk import assets

    folders = []
    spec = params.get("spec")
    if isinstance(spec, str):
        folders.append(Path(spec).expanduser())
        hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or "~/.cache/huggingface") / "hub"
        snapshots = Path(hub).expanduser() / f"models--{spec.replace('/', '--')}" / "snapshots"
        if snapshots.is_dir():
            folders += sorted(snapshots.iterdir())
    # the built-in SmolLM2 factories load the converted asset folder
    if factory.__module__ == "mhee_sdk.backbones.hf" and factory.__qualname__.startswith("smollm2"):
        folders.append(assets.home() / assets.MODEL_FOLDER)
    return folders
