"""Exit policies: after each exit head, which requests are confident enough to stop?

A policy sees only ``probs[B, j]``, the P(like) of every head evaluated so far for each row, and
decides row by row. Nothing else goes in, so replaying a policy over logged full-depth outputs
([`replay`][mhee_sdk.exits.policies.replay]) gives exactly what a live run gives. For a binary answer,
``max-prob``, ``entropy`` and ``margin`` are monotone in ``|p - 0.5|``: they differ only in how the
threshold reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import ExitPolicy, Knob
from mhee_sdk.metrics import WeightedAUC

FULL_DEPTH = "never"
"""The policy of a full-depth run: every exit head logged for every request, so any policy can be replayed on it."""


def _confidence(p: np.ndarray) -> np.ndarray:
    return np.maximum(p, 1.0 - p)


def _levels(level: float, layers: Sequence[int]) -> dict[int, float]:
    return {int(layer): float(level) for layer in layers}


def _check_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is outside [{low}, {high}]")
    return float(value)


@dataclass
class Never:
    """Full depth: never exit early (the engine stops at the last exit layer)."""

    name: str = field(default=FULL_DEPTH, init=False)
    knobs: ClassVar[tuple[Knob, ...]] = ()

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        return np.zeros(len(probs), dtype=bool)


@dataclass
class FixedLayer:
    """Every request exits at the first exit layer >= `layer`."""

    layer: int = 12
    name: str = field(default="fixed-layer", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (Knob("layer", exit_layers=True, integer=True, default=12),)

    def __post_init__(self) -> None:
        if int(self.layer) < 1:
            raise ValueError(f"layer={self.layer!r} must be a 1-based layer number >= 1")

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        return np.full(len(probs), layer >= self.layer, dtype=bool)


@dataclass
class MaxProb:
    """Exit when the current head's confidence max(p, 1 - p) reaches `threshold`."""

    threshold: float = 0.9
    name: str = field(default="max-prob", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (Knob("threshold", 0.5, 1.0, 0.01, 0.9),)

    def __post_init__(self) -> None:
        _check_range("threshold", self.threshold, 0.5, 1.0)

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        return _confidence(probs[:, -1]) >= self.threshold

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """The threshold itself, at every layer."""
        return _levels(self.threshold, layers)


@dataclass
class Entropy:
    """DeeBERT: exit when the binary entropy (bits) of the current head is at most `threshold`."""

    threshold: float = 0.5
    name: str = field(default="entropy", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (Knob("threshold", 0.0, 1.0, 0.01, 0.5),)

    def __post_init__(self) -> None:
        _check_range("threshold", self.threshold, 0.0, 1.0)

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        p = np.clip(probs[:, -1], 1e-12, 1 - 1e-12)
        entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return entropy <= self.threshold

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """The p in [0.5, 1] whose binary entropy is the threshold (entropy falls as p grows there)."""
        p = np.linspace(0.5, 1.0 - 1e-9, 20001)
        entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return _levels(p[np.argmax(entropy <= self.threshold)], layers)


@dataclass
class Margin:
    """Exit when the gap between the two class probabilities |p - (1 - p)| reaches `threshold`."""

    threshold: float = 0.8
    name: str = field(default="margin", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (Knob("threshold", 0.0, 1.0, 0.01, 0.8),)

    def __post_init__(self) -> None:
        _check_range("threshold", self.threshold, 0.0, 1.0)

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        return np.abs(2.0 * probs[:, -1] - 1.0) >= self.threshold

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """|2p - 1| >= m is max(p, 1 - p) >= (1 + m) / 2."""
        return _levels((1.0 + self.threshold) / 2.0, layers)


def _stable(probs: np.ndarray, window: int) -> np.ndarray:
    """True where the last `window` heads all predict the same class (False if fewer heads ran)."""
    if probs.shape[1] < window:
        return np.zeros(len(probs), dtype=bool)
    classes = probs[:, -window:] >= 0.5
    return classes.all(axis=1) | (~classes).all(axis=1)


@dataclass
class Patience:
    """PABEE: exit once the predicted class stayed unchanged for `patience` consecutive exit layers.

    That is, the last ``patience + 1`` heads agree.
    """

    patience: int = 2
    name: str = field(default="patience", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (Knob("patience", 1, 5, 1, 2, integer=True),)

    def __post_init__(self) -> None:
        if int(self.patience) < 1:
            raise ValueError(f"patience={self.patience!r} must be >= 1")

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        return _stable(probs, int(self.patience) + 1)


@dataclass
class MultiHead:
    """The paper's rule: exit when max(p, 1-p) / min(p, 1-p) >= `ratio` and the last `window`
    heads (this one included) predict the same class."""

    ratio: float = 3.0
    window: int = 2
    name: str = field(default="multi-head", init=False)
    knobs: ClassVar[tuple[Knob, ...]] = (
        Knob("ratio", 1.0, 20.0, 0.5, 3.0, log=True),  # a ratio's effect is multiplicative
        Knob("window", 1, 4, 1, 2, integer=True),
    )

    def __post_init__(self) -> None:
        if not self.ratio >= 1.0:
            raise ValueError(f"ratio={self.ratio!r} must be >= 1 (1 = always confident)")
        if int(self.window) < 1:
            raise ValueError(f"window={self.window!r} must be >= 1")

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        p = probs[:, -1]
        high, low = _confidence(p), np.minimum(p, 1.0 - p)
        return (high >= self.ratio * low) & _stable(probs, int(self.window))

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """p / (1 - p) >= r is max(p, 1 - p) >= r / (1 + r) (the window must agree as well)."""
        return _levels(self.ratio / (1.0 + self.ratio), layers)


@dataclass
class Calibrated:
    """Per-layer confidence thresholds chosen on validation data (`calibrate`) so that the AUC
    drop versus full depth stays within `budget` there, with a margin for sampling noise (in the spirit
    of CALM, which bounds the risk with high probability rather than on average).

    The drop must stay within `budget` in a share `confidence` of `resamples` bootstrap resamples of
    the validation requests, not only on the sample itself: a few hundred validation requests measure
    AUC to about +-0.03, so a point estimate lets the shallowest layer spend the whole budget on noise.
    ``resamples=0`` uses the point estimate alone. Uncalibrated it never exits. `thresholds` maps exit
    layer -> confidence threshold.
    """

    budget: float = 0.005
    confidence: float = 0.9
    resamples: int = 200
    seed: int = 0
    thresholds: dict[int, float] = field(default_factory=dict)
    name: str = field(default="calibrated", init=False)

    def __post_init__(self) -> None:
        _check_range("budget", self.budget, 0.0, 1.0)
        _check_range("confidence", self.confidence, 0.5, 1.0)
        if int(self.resamples) != self.resamples or self.resamples < 0:
            raise ValueError(f"resamples={self.resamples!r} must be a whole number >= 0")
        self.thresholds = {int(layer): float(value) for layer, value in self.thresholds.items()}

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        threshold = self.thresholds.get(int(layer), np.inf)
        return _confidence(probs[:, -1]) >= threshold

    @property
    def is_calibrated(self) -> bool:
        """True once thresholds are set (by `calibrate` or from a stored run)."""
        return bool(self.thresholds)

    def calibrated_params(self) -> dict[str, Any]:
        """The thresholds, keyed by layer as text (what a run config stores)."""
        return {"thresholds": {str(layer): value for layer, value in self.thresholds.items()}}

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """The calibrated per-layer thresholds (layers where it never exits left out)."""
        return {layer: value for layer, value in self.thresholds.items() if np.isfinite(value) and layer in layers}

    def calibrate(
        self,
        probs: np.ndarray,
        labels: np.ndarray,
        layers: Sequence[int],
        grid: Sequence[float] = tuple(np.round(np.arange(0.99, 0.499, -0.01), 2)),
    ) -> Calibrated:
        """Greedy, shallow layer first: the lowest threshold that keeps the AUC drop within budget.

        probs: ``[N, L]`` full-depth outputs on validation requests; labels: ``[N]``; layers: the L exit layers.
        """
        probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
        if probs.ndim != 2 or probs.shape != (len(labels), len(layers)):
            raise ValueError(f"probs must be [N, L] = [{len(labels)}, {len(layers)}], got {probs.shape}")
        if len(np.unique(labels)) < 2:
            raise ValueError("calibration needs both positive and negative labels")
        n = len(labels)
        weights = np.ones((1, n))  # row 0: the sample itself
        if self.resamples:
            rng = np.random.default_rng(self.seed)
            weights = np.vstack([weights, rng.multinomial(n, np.full(n, 1.0 / n), size=int(self.resamples))])
        auc_under = WeightedAUC(labels, weights)
        reference = auc_under(probs[:, -1])

        def within_budget() -> bool:
            drops = reference - auc_under(replay(self, probs, layers).prob)
            bound = np.nanquantile(drops[1:], self.confidence) if self.resamples else drops[0]
            return bool(drops[0] <= self.budget and bound <= self.budget)

        self.thresholds = {}
        for layer in layers[:-1]:
            chosen = np.inf
            for threshold in grid:
                self.thresholds[int(layer)] = float(threshold)
                if not within_budget():
                    break  # lower thresholds only exit more rows: stop at the first failure
                chosen = float(threshold)
            self.thresholds[int(layer)] = chosen
        return self


@dataclass(frozen=True)
class Replay:
    """Where each row exits: index into the exit layers, the layer itself, and the prob there."""

    index: np.ndarray
    layer: np.ndarray
    prob: np.ndarray


def decide_rows(policy: ExitPolicy, layer: int, probs: np.ndarray) -> np.ndarray:
    """The policy's decision for each row of ``probs [B, j]``, checked: a bool array of shape ``[B]``.

    The live engine and [`replay`][mhee_sdk.exits.policies.replay] both go through here, so a policy that
    breaks the contract fails the same way in both (and never silently broadcasts, or turns NaN into "exit").
    """
    decision = np.asarray(policy.decide(int(layer), probs))
    if decision.shape != (len(probs),):
        raise ValueError(
            f"policy {policy.name!r} returned shape {decision.shape} at layer {layer}, expected ({len(probs)},)"
        )
    if decision.dtype != np.bool_:
        raise ValueError(
            f"policy {policy.name!r} returned {decision.dtype} decisions at layer {layer}; "
            "return a numpy bool array (True = exit here)"
        )
    return decision


def replay(policy: ExitPolicy, probs: np.ndarray, layers: Sequence[int]) -> Replay:
    """Run `policy` over logged per-layer outputs ``probs[N, L]`` exactly as the engine would live.

    Policies decide each row from its own outputs only, so asking every row at every layer and taking
    the first "stop" gives the engine's answer (which asks only the rows still running).
    """
    probs = np.asarray(probs, dtype=np.float64)
    n, width = probs.shape
    if width != len(layers):
        raise ValueError(f"probs has {width} columns but {len(layers)} exit layers were given")
    stops = np.ones((n, width), dtype=bool)  # the last exit layer always stops
    for j, layer in enumerate(layers[:-1]):
        stops[:, j] = decide_rows(policy, layer, probs[:, : j + 1])
    index = stops.argmax(axis=1)  # first True
    return Replay(index=index, layer=np.asarray(layers)[index], prob=probs[np.arange(n), index])


@hookimpl
def register_exit_policies(register) -> None:
    register(FULL_DEPTH, Never)
    register("fixed-layer", FixedLayer)
    register("max-prob", MaxProb)
    register("entropy", Entropy)
    register("margin", Margin)
    register("patience", Patience)
    register("multi-head", MultiHead)
    register("calibrated", Calibrated)
