"""A run described as plain data (TOML file or dict): what to load, how to retrieve, which heads and policy."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhee_sdk.interfaces import SPLITS


@dataclass
class RunConfig:
    """Everything a run needs. Plugin names are looked up in the registry; `*_params` go to their factories.

    Example TOML:

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
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is unknown; choose from: {', '.join(SPLITS)}")
        for name in ("k", "prompt_tokens", "batch_size", "train_requests", "valid_requests", "eval_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "k" else 1):
                raise ValueError(f"{name}={value!r} must be a {'non-negative' if name == 'k' else 'positive'} integer")
        for name in ("dataset_params", "retriever_params", "backbone_params", "head_params", "policy_params"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table/dict, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a dict; unknown keys are an error listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file."""
        with Path(path).open("rb") as handle:
            return cls.from_dict(tomllib.load(handle))

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
