"""The per-batch work of evaluation and of hidden-state collection, as picklable worker factories.

An executor (``mhee_sdk.executors``) calls a factory once per worker with the shared objects (heads,
policies) and then maps batches through what it returns. In this process the factory gets the live
backbone; on a Ray actor it gets a :class:`BackboneSpec` and builds the backbone there, once, by
registry name: a backbone is never pickled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.exits.heads import ExitHeads
from mhee_sdk.interfaces import Backbone, ExitPolicy
from mhee_sdk.loop import LayerLoop
from mhee_sdk.types import Prediction


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker rebuilds the driver's backbone: registry name, factory options, and the fingerprint to match."""

    name: str
    options: dict[str, Any]
    fingerprint: str

    def __call__(self) -> Backbone:
        """Build the backbone from the worker's registry; a different fingerprint is an error."""
        from mhee_sdk.registry import get_registry

        backbone = get_registry().create("backbone", self.name, **self.options)
        if backbone.fingerprint != self.fingerprint:
            raise RuntimeError(
                f"a worker built backbone {self.name!r} as {backbone.fingerprint!r}, but the driver runs "
                f"{self.fingerprint!r}: set dtype explicitly in the run config, and install the same mhee-sdk, "
                "plugins and assets (MHEE_HOME) on every node"
            )
        return backbone


def _resolve(backbone: Backbone | BackboneSpec) -> Backbone:
    return backbone() if isinstance(backbone, BackboneSpec) else backbone


@dataclass(frozen=True)
class Chunk:
    """One batch of a run: its position among the run's batches and what the engine needs for it."""

    index: int
    texts: list[str]
    request_ids: list[int]
    features: np.ndarray | None = None  # [B, F] collaborative features
    prefix: torch.Tensor | None = None  # [B, S, H] soft tokens


@dataclass(frozen=True)
class ChunkOutput:
    """Every policy's predictions for one chunk (policy order), and each policy's engine seconds."""

    predictions: list[list[Prediction]]
    seconds: list[float]


@dataclass(frozen=True)
class PolicyChunks:
    """Factory of the evaluation worker: all policies on one chunk, in rotating order, each timed."""

    backbone: Backbone | BackboneSpec
    system: str | None = None

    def __call__(self, heads: ExitHeads, policies: Sequence[ExitPolicy]) -> Callable[[Chunk], ChunkOutput]:
        backbone = _resolve(self.backbone)
        heads = heads.to(backbone.device)
        engines = [EarlyExitEngine(backbone, heads, policy, system=self.system) for policy in policies]

        def run_chunk(chunk: Chunk) -> ChunkOutput:
            _inject_fault(chunk.index)
            prefix = None if chunk.prefix is None else chunk.prefix.to(backbone.device)
            out: list[list[Prediction]] = [[] for _ in engines]
            seconds = [0.0] * len(engines)
            # rotate who goes first: no policy always runs cold
            for j in np.roll(np.arange(len(engines)), -chunk.index):
                started = time.perf_counter()
                out[j] = engines[j].run_batch(chunk.texts, chunk.request_ids, chunk.features, prefix)
                seconds[j] = time.perf_counter() - started
            return ChunkOutput(out, seconds)

        return run_chunk


@dataclass(frozen=True)
class HiddenChunk:
    """Rows ``start .. start + len(texts)`` of a hidden-state collection."""

    index: int
    start: int
    texts: list[str]
    prefix: torch.Tensor | None = None


@dataclass(frozen=True)
class HiddenChunks:
    """Factory of the hidden-state worker: pooled states ``[B, L, H]`` at `layers`, as `dtype` (the cache's)."""

    backbone: Backbone | BackboneSpec
    layers: list[int]
    system: str | None = None
    dtype: Any = field(default=np.float32)

    def __call__(self) -> Callable[[HiddenChunk], np.ndarray]:
        backbone = _resolve(self.backbone)

        def run_chunk(chunk: HiddenChunk) -> np.ndarray:
            _inject_fault(chunk.index)
            prefix = None if chunk.prefix is None else chunk.prefix.to(backbone.device)
            with torch.inference_mode():
                loop = LayerLoop(backbone, chunk.texts, self.layers, prefix=prefix, system=self.system)
                pooled = np.stack([p.float().cpu().numpy() for _, p in loop], axis=1)  # [B, L, H]
            with np.errstate(over="ignore"):  # the cache reports non-finite rows itself
                return pooled.astype(self.dtype)

        return run_chunk


# Test hook (not an API): ``MHEE_TEST_FAIL_BATCH="<index>:<mode>:<marker file>[,...]"`` makes the worker fail
# on batch <index>; mode ``raise-once`` / ``exit-once`` (os._exit mid-batch) fail the first attempt only (the
# marker file, created then, survives actor restarts), ``raise-always`` every attempt. The Ray executor
# forwards MHEE_* variables to its workers. tests/test_ray.py uses it.
FAULT_VARIABLE = "MHEE_TEST_FAIL_BATCH"


def _inject_fault(index: int) -> None:
    """Fail as ``MHEE_TEST_FAIL_BATCH`` says, if it names batch `index`; otherwise nothing."""
    for fault in filter(None, os.environ.get(FAULT_VARIABLE, "").split(",")):
        target, mode, marker = fault.split(":", 2)
        if int(target) != index:
            continue
        if mode == "raise-always":
            raise RuntimeError(f"injected failure on batch {index} ({FAULT_VARIABLE})")
        if mode not in ("raise-once", "exit-once"):
            raise ValueError(f"{FAULT_VARIABLE}: mode {mode!r} is unknown; use raise-once, exit-once or raise-always")
        try:
            Path(marker).touch(exist_ok=False)  # atomic: exactly one attempt gets here first
        except FileExistsError:
            continue
        if mode == "exit-once":
            os._exit(1)
        raise RuntimeError(f"injected one-time failure on batch {index} ({FAULT_VARIABLE})")
