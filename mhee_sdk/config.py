"""A run described as plain data (TOML file or dict): what to load, how to retrieve, which heads and policy."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhee_sdk.interfaces import SPLITS
from mhee_sdk.validation import ConfigError, field_problems, value_problem

POSITIVE = ("prompt_tokens", "batch_size", "train_requests", "valid_requests", "eval_requests")
"""Integer fields that must be >= 1; every other integer field (k, seed ...) must be >= 0."""


@dataclass
class RunConfig:
    """Everything a run needs. Plugin names are looked up in the registry; `*_params` go to their factories.

    Example TOML::

        name = "gcn + max-prob"
        retriever = "gcn"
        retriever_params = { mode = "users" }
        policy = "max-prob"
        policy_params = { threshold = 0.8 }
    """

    name: str = ""
    dataset: str = "movielens-100k"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    retriever: str = "recent"
    retriever_params: dict[str, Any] = field(default_factory=dict)
    k: int = 10
    prompt_tokens: int = 160
    backbone: str = "smollm2-135m"
    backbone_params: dict[str, Any] = field(default_factory=dict)
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
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file (problems are reported as a :class:`ConfigError` naming the file)."""
        values = read_toml(path)
        problems = config_problems(values)
        if problems:
            raise ConfigError(problems, str(path))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what the store keeps as JSON)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

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
    return problems
