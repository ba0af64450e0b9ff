"""The ``consecutive-confident`` exit policy: stop once the last `count` heads were all confident.

Rename the class and its ``name``, then rewrite ``decide``. The rules every exit policy must keep
(``mhee_sdk.testing.check_exit_policy`` checks them, see tests/test_policy.py):

* ``decide(layer, probs)`` gets the 1-based exit layer just evaluated and ``probs[B, j]``, the
  P(like) of every exit head so far for the B requests still running (last column = this layer);
* it returns a numpy bool array ``[B]`` (True = this request stops here);
* each row is decided from that row alone and from nothing but ``(layer, probs)``: the engine drops
  finished rows between calls, and offline replay calls it on logged outputs, so anything else
  (batch statistics, counters kept on ``self``, randomness) makes live and replayed runs disagree.

Two optional extras (see ``mhee_sdk.interfaces``): ``knobs`` gives the policy sliders in the notebook
``PolicyTuner`` (``TunablePolicy``), and ``confidence_levels`` draws its threshold in ``ExitExplorer``
(``ThresholdPolicy``). Delete them if your policy has neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mhee_sdk import Knob


@dataclass
class ConsecutiveConfident:
    """Exit when the last `count` heads were all at least `threshold` confident (max(p, 1 - p)).

    Unlike ``multi-head`` it does not ask the heads to agree on the class, only to be sure.
    """

    # Parameters are plain keyword arguments with defaults: a run config passes them as
    # `policy_params = { count = 3, threshold = 0.9 }`.
    count: int = 2
    threshold: float = 0.8
    # `name` labels runs and progress bars; keep it equal to the registered name.
    name: str = field(default="consecutive-confident", init=False)
    # Optional: one slider per tunable parameter; the first is swept for the tuner's Pareto curve.
    knobs: ClassVar[tuple[Knob, ...]] = (
        Knob("threshold", low=0.5, high=1.0, step=0.01, default=0.8),
        Knob("count", low=1, high=5, step=1, default=2, integer=True),
    )

    def __post_init__(self) -> None:
        # Reject bad parameters when the policy is built, naming the value and what is allowed.
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count={self.count!r} must be an integer >= 1")
        if not 0.5 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} is outside [0.5, 1.0]")

    def decide(self, layer: int, probs: np.ndarray) -> np.ndarray:
        """True for the rows whose last `count` head outputs all have max(p, 1 - p) >= `threshold`."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape[1] < self.count:  # fewer heads have run than we need to look at
            return np.zeros(len(probs), dtype=bool)
        recent = probs[:, -self.count :]  # [B, count]
        confidence = np.maximum(recent, 1.0 - recent)
        return (confidence >= self.threshold).all(axis=1)

    def confidence_levels(self, layers: Sequence[int]) -> dict[int, float]:
        """Optional: the confidence it compares with, per exit layer (the explorer draws it)."""
        return {int(layer): float(self.threshold) for layer in layers}
