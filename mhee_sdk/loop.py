"""The one layer loop: a batch goes up the backbone and pauses at each exit layer.

The engine (with compaction), head training (hidden-state collection) and fine-tuning (with gradients)
all run their batches through [`LayerLoop`][mhee_sdk.loop.LayerLoop]; none of them calls ``Backbone.step`` itself:

    loop = LayerLoop(backbone, texts, exit_layers=[3, 6, 9])
    for layer, pooled in loop:      # pooled: [rows still running, H]
        ...
        loop.keep(rows)             # optional: later layers run on these rows only
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mhee_sdk.interfaces import Backbone


def check_exit_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Sorted distinct 1-based exit layers, each within ``1..num_layers``."""
    picked = sorted({int(layer) for layer in layers})
    if not picked or picked[0] < 1 or picked[-1] > num_layers:
        raise ValueError(f"exit layers {list(layers)} must be non-empty and lie in 1..{num_layers}")
    return picked


class LayerLoop:
    """Runs one batch of prompts up `backbone`, yielding ``(layer, pooled)`` at each exit layer.

    It stops after the deepest exit layer. `running` maps each row still in the batch to its position
    in `texts`. Gradients flow unless the caller turns them off (``torch.inference_mode``).
    prefix: ``[B, S, H]`` soft tokens; system: the chat system message (see ``Backbone.start``).
    """

    def __init__(
        self,
        backbone: Backbone,
        texts: Sequence[str],
        exit_layers: Sequence[int],
        prefix: torch.Tensor | None = None,
        system: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.exit_layers = check_exit_layers(exit_layers, backbone.num_layers)
        self.state = backbone.start(texts, prefix=prefix, system=system)
        self.running = np.arange(len(texts))

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        wanted = set(self.exit_layers)
        for layer in range(1, self.exit_layers[-1] + 1):
            self.state = self.backbone.step(self.state)
            if layer in wanted:
                yield layer, self.backbone.pooled(self.state)

    def keep(self, rows: np.ndarray) -> None:
        """Keep only `rows` (positions among the rows still running), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        self.state = self.state.select(torch.as_tensor(rows, device=self.state.hidden.device))
        self.running = self.running[rows]
