"""The batched early-exit loop with row compaction.

For each batch: embed, then run decoder layers one at a time. At every exit layer the head gives
P(like) for the rows still running, the policy picks the rows that stop, and those rows are removed
from the batch (``LayerState.select``) so later layers run on fewer rows. Work done is therefore the
sum of the exit layers, not batch x depth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from mhee_sdk.exits.heads import ExitHeads
from mhee_sdk.interfaces import Backbone, ExitPolicy
from mhee_sdk.types import Prediction


@dataclass
class EarlyExitEngine:
    """Runs prompts through `backbone` with `heads` on the exit layers, stopping rows per `policy`."""

    backbone: Backbone
    heads: ExitHeads
    policy: ExitPolicy

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
    ) -> list[Prediction]:
        """Predictions for every prompt, in input order.

        sort_by_length: batch prompts of similar length together (less padding); latencies then
        reflect that batching. features: ``[N, F]`` collaborative features, for heads that read them.
        prefix: ``[N, S, H]`` soft-token embeddings placed before each prompt (see ``Backbone.start``).
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
        with tqdm(
            total=len(texts),
            desc=f"early exit ({getattr(self.policy, 'name', 'policy')})",
            disable=not progress,
            leave=False,
        ) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch_features = None if features is None else np.asarray(features)[chunk]
                batch_prefix = None if prefix is None else prefix[chunk]
                out = self.run_batch([texts[i] for i in chunk], [ids[i] for i in chunk], batch_features, batch_prefix)
                for position, prediction in zip(chunk, out, strict=True):
                    results[position] = prediction
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
        last = layers[-1]
        state = self.backbone.start(texts) if prefix is None else self.backbone.start(texts, prefix=prefix)
        if self.heads.needs_features:
            if features is None or len(features) != len(texts):
                raise ValueError("these exit heads read collaborative features: pass features=[N, F] to the engine")
            tensor = torch.as_tensor(np.asarray(features, dtype=np.float32), device=state.hidden.device)
            state = replace(state, extras={**state.extras, "features": tensor})
        running = np.arange(len(texts))  # original row of each row still in the batch
        probs = np.full((len(texts), len(layers)), np.nan)
        done: dict[int, Prediction] = {}
        column = 0
        for layer in range(1, last + 1):
            state = self.backbone.step(state)
            if layer not in self.heads:
                continue
            head_out = self.heads.predict(layer, self.backbone.pooled(state), state.extras.get("features"))
            probs[running, column] = head_out.float().cpu().numpy()
            if layer == last:
                stop = np.ones(len(running), dtype=bool)
            else:
                stop = np.asarray(self.policy.decide(layer, probs[running, : column + 1]), dtype=bool)
                if stop.shape != (len(running),):
                    raise ValueError(
                        f"policy {getattr(self.policy, 'name', self.policy)!r} returned shape {stop.shape}, "
                        f"expected ({len(running)},)"
                    )
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
                keep = np.flatnonzero(~stop)
                state = state.select(torch.as_tensor(keep, device=state.hidden.device))
                running = running[keep]
            column += 1
        return [done[row] for row in range(len(texts))]
