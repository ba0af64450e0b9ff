"""The batched early-exit loop with row compaction.

For each batch: embed, then run decoder layers one at a time (``mhee_sdk.loop.LayerLoop``). At every
exit layer the head gives P(like) for the rows still running, the policy picks the rows that stop, and
those rows are removed from the batch so later layers run on fewer rows. Work done is therefore the
sum of the exit layers, not batch x depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mhee_sdk.exits.heads import ExitHeads, check_head_output
from mhee_sdk.exits.policies import decide_rows
from mhee_sdk.interfaces import Backbone, ExitPolicy
from mhee_sdk.loop import LayerLoop
from mhee_sdk.progress import progress_bar
from mhee_sdk.types import Prediction


@dataclass(frozen=True)
class BatchResult:
    """One finished batch: positions of its prompts in the run's input, their predictions, engine seconds."""

    positions: list[int]
    predictions: list[Prediction]
    seconds: float


OnBatch = Callable[[BatchResult], None]


@dataclass
class EarlyExitEngine:
    """Runs prompts through `backbone` with `heads` on the exit layers, stopping rows per `policy`.

    system: the chat system message every prompt gets (see ``Backbone.start``); it must be the one the
    heads were trained with, so scripts get their engine from ``Experiment.engine`` rather than build it.
    """

    backbone: Backbone
    heads: ExitHeads
    policy: ExitPolicy
    system: str | None = None

    def __post_init__(self) -> None:
        if self.heads.layers[-1] > self.backbone.num_layers:
            raise ValueError(
                f"exit layer {self.heads.layers[-1]} is beyond the backbone's {self.backbone.num_layers} layers"
            )

    def run(
        self,
        texts: Sequence[str],
        request_ids: Sequence[int] | None = None,
        batch_size: int = 32,
        sort_by_length: bool = False,
        progress: bool = True,
        features: np.ndarray | None = None,
        prefix: torch.Tensor | None = None,
        on_batch: OnBatch | None = None,
    ) -> list[Prediction]:
        """Predictions for every prompt, in input order.

        sort_by_length: batch prompts of similar length together (less padding); latencies then
        reflect that batching. features: ``[N, F]`` collaborative features, for heads that read them.
        prefix: ``[N, S, H]`` soft-token embeddings placed before each prompt (see ``Backbone.start``).
        on_batch: called after each batch (e.g. to log it to a store), outside the timed engine work.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        ids = list(range(len(texts))) if request_ids is None else [int(i) for i in request_ids]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(ids)} request ids")
        order = list(range(len(texts)))
        if sort_by_length:
            order.sort(key=lambda i: len(texts[i]))
        results: dict[int, Prediction] = {}
        with progress_bar(total=len(texts), desc=f"early exit ({self.policy.name})", enabled=progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                started = time.perf_counter()
                out = self.run_batch(
                    [texts[i] for i in chunk],
                    [ids[i] for i in chunk],
                    None if features is None else np.asarray(features)[chunk],
                    None if prefix is None else prefix[chunk],
                )
                seconds = time.perf_counter() - started
                for position, prediction in zip(chunk, out, strict=True):
                    results[position] = prediction
                if on_batch is not None:
                    on_batch(BatchResult(chunk, out, seconds))
                bar.update(len(chunk))
        return [results[i] for i in range(len(texts))]

    @torch.inference_mode()
    def run_batch(
        self,
        texts: Sequence[str],
        request_ids: Sequence[int],
        features: np.ndarray | None = None,
        prefix: torch.Tensor | None = None,
    ) -> list[Prediction]:
        """One batch through the loop; returns predictions in the batch's order."""
        started = time.perf_counter()
        layers = self.heads.layers
        if self.heads.needs_features and (features is None or len(features) != len(texts)):
            raise ValueError("these exit heads read collaborative features: pass features=[N, F] to the engine")
        loop = LayerLoop(self.backbone, texts, layers, prefix=prefix, system=self.system)
        device = loop.state.hidden.device
        extra = None if features is None else torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
        probs = np.full((len(texts), len(layers)), np.nan)
        done: dict[int, Prediction] = {}
        for column, (layer, pooled) in enumerate(loop):
            running = loop.running  # original row of each row still in the batch
            rows_extra = None if extra is None else extra[torch.as_tensor(running, device=device)]
            head_out = self.heads.predict(layer, pooled, rows_extra).float().cpu().numpy()
            probs[running, column] = check_head_output(head_out, layer, self.heads.kind)
            if layer == layers[-1]:
                stop = np.ones(len(running), dtype=bool)
            else:
                stop = decide_rows(self.policy, layer, probs[running, : column + 1])
            elapsed = time.perf_counter() - started
            for row in running[stop]:
                done[int(row)] = Prediction(
                    request_id=int(request_ids[row]),
                    prob=float(probs[row, column]),
                    exit_layer=layer,
                    layer_probs=tuple(float(x) for x in probs[row, : column + 1]),
                    latency_s=elapsed,
                )
            if stop.all():
                break
            if stop.any():
                loop.keep(np.flatnonzero(~stop))
        return [done[row] for row in range(len(texts))]
