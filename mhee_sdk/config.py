"""A run described as plain data (TOML file or dict): what to load, how to retrieve, which heads and policy."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhee_sdk.data.prompt import PromptTemplate
from mhee_sdk.interfaces import SPLITS
from mhee_sdk.validation import ConfigError, field_problems, value_problem

POSITIVE = ("prompt_tokens", "batch_size", "train_requests", "valid_requests", "eval_requests", "cold_threshold")
"""Integer fields that must be >= 1; every other integer field (k, seed ...) must be >= 0."""

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def plain(value: Any) -> Any:
    """`value` as JSON-ready data; an object that is not plain data becomes ``{"__object__": "module.Class", ...}``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    kind = type(value)
    return {"__object__": f"{kind.__module__}.{kind.__qualname__}", "repr": repr(value)[:120]}


@dataclass
class RunConfig:
    """Everything a run needs. Plugin names are looked up in the registry; `*_params` go to their factories.

    Example TOML:

        name = "gcn + max-prob"
        retriever = "gcn"
        retriever_params = { mode = "users" }
        policy = "max-prob"
        policy_params = { threshold = 0.8 }
        prompt = { noun = "book" }     # fields of the dataset's PromptTemplate to override

    `cold_threshold`: a user or item with fewer training interactions than this is cold (the report's slices).
    """

    name: str = ""
    dataset: str = "movielens-100k"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    retriever: str = "recent"
    retriever_params: dict[str, Any] = field(default_factory=dict)
    k: int = 10
    prompt_tokens: int = 160
    prompt: dict[str, Any] = field(default_factory=dict)
    backbone: str = "smollm2-135m"
    backbone_params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # float32, bfloat16, float16; auto: what the hardware runs natively (see docs/concepts.md)
    device: str = "auto"  # cpu, cuda, cuda:N; auto: CUDA when present
    head: str = "linear"
    head_params: dict[str, Any] = field(default_factory=dict)
    exit_layers: list[int] | None = None  # default: every 3rd layer and the last
    policy: str = "never"
    policy_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    train_requests: int = 600
    valid_requests: int = 300
    eval_requests: int = 200
    seed: int = 0
    cold_threshold: int = 5

    def __post_init__(self) -> None:
        problems = config_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a dict; every unknown key (with a did-you-mean) and bad value is reported at once."""
        problems = config_problems(values)
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    @classmethod
    def coerce(cls, config: RunConfig | dict[str, Any] | str | os.PathLike | None) -> RunConfig:
        """A RunConfig from a RunConfig, a dict, a TOML file path, or None (the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, RunConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, str | os.PathLike):
            return cls.from_toml(config)
        raise TypeError(f"a run config is a RunConfig, dict or TOML path, not {type(config).__name__}")

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file (problems are reported as a :class:`ConfigError` naming the file)."""
        values = read_toml(path)
        problems = config_problems(values)
        if problems:
            raise ConfigError(problems, str(path))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what the store keeps as JSON); live objects become descriptions (see `reproducible`)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self, name: str) -> Any:
        """One field as plain data (live objects described)."""
        return plain(getattr(self, name))

    @property
    def reproducible(self) -> bool:
        """False when a parameter is a live object (e.g. a LlamaIndex retriever): the config alone cannot rebuild it."""
        return "__object__" not in json.dumps(self.to_dict())

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def backbone_options(self) -> dict[str, Any]:
        """The backbone factory's keyword arguments: ``backbone_params`` plus dtype/device unless left on auto."""
        chosen = {name: getattr(self, name) for name in ("dtype", "device") if getattr(self, name) != "auto"}
        return {**self.backbone_params, **chosen}

    @property
    def label(self) -> str:
        """Short name for tables: `name` or ``policy{params}``."""
        if self.name:
            return self.name
        params = ",".join(f"{k}={v}" for k, v in sorted(self.policy_params.items()) if k != "thresholds")
        return f"{self.policy}({params})" if params else self.policy


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML file; a missing, unreadable or malformed file is a ConfigError saying so."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        problem = f"config file {str(path)!r} not found; check the path (docs/cli.md shows a config)"
    except IsADirectoryError:
        problem = f"{str(path)!r} is a folder; give the path of a TOML config file"
    except OSError as err:
        problem = f"cannot read config file {str(path)!r} ({err.strerror}); check its permissions"
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        problem = f"{path} is not valid TOML: {err}; fix the syntax (strings in quotes, tables in {{ }})"
    raise ConfigError([problem])


def config_problems(values: dict[str, Any]) -> list[str]:
    """Problems of config values that need no plugin look-up: keys, types, ranges, the split."""
    problems = field_problems(RunConfig, values)
    integers = {f.name for f in dataclasses.fields(RunConfig) if f.type == "int"}
    for name, value in values.items():
        if name not in integers or value_problem(value, "int", name):
            continue  # a wrong type is reported once, above
        low = 1 if name in POSITIVE else 0
        if value < low:
            problems.append(f"{name}={value!r} must be a {'positive' if low else 'non-negative'} integer")
    split = values.get("split")
    if isinstance(split, str) and split not in SPLITS:
        problems.append(f"split {split!r} is unknown; choose from: {', '.join(SPLITS)}")
    dtype, device = values.get("dtype", "auto"), values.get("device", "auto")
    if isinstance(dtype, str) and dtype not in DTYPE_NAMES:
        problems.append(f"dtype={dtype!r} is unknown; choose from: {', '.join(DTYPE_NAMES)}")
    if isinstance(device, str) and not DEVICE_PATTERN.match(device):
        problems.append(f"device={device!r} is unknown; use auto, cpu, cuda or cuda:N")
    prompt = values.get("prompt", {})
    if isinstance(prompt, dict):
        try:
            PromptTemplate().with_overrides(prompt)  # unknown keys and bad values fail here, not mid-run
        except (TypeError, ValueError) as err:
            problems.append(f"prompt: {err}")
    return problems
