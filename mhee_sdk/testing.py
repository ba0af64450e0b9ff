"""Conformance checks for plugin authors: do my retriever, backbone, exit head, policy and baseline keep the contract?

Call them from your plugin's tests; each raises ``ContractError`` with a message that says what to fix:

    from mhee_sdk.testing import check_exit_policy
    def test_my_policy_conforms():
        check_exit_policy(MyPolicy())

[`synthetic_full_depth_run`][mhee_sdk.testing.synthetic_full_depth_run] logs a model-free full-depth run, to
test a policy with ``store.replay`` or time ``store.sweep`` without any backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mhee_sdk.interfaces import Backbone, ExitPolicy, protocol_members
from mhee_sdk.types import Request, Retrieved


class ContractError(AssertionError):
    """An implementation breaks the interface contract; the message says how."""


def _fail(what: str, problem: str, fix: str) -> ContractError:
    return ContractError(f"{what}: {problem}. Fix: {fix}")


def _fit_on_train(
    obj: Any, dataset: Any, what: str, requests: Sequence[Request] | None, sample: dict[str, int]
) -> list[Request]:
    """Fit `obj` on the dataset's train split (it must return itself); the requests to check it on."""
    fitted = obj.fit(dataset.load().split("train"), dataset.log)
    if fitted is not obj:
        raise _fail(what, "fit() did not return self", "end fit() with `return self`")
    if requests is not None:
        return list(requests)
    return [request for split, limit in sample.items() for request in dataset.requests(split, limit=limit, seed=1)]


def check_retriever(retriever, dataset, k: int = 5, requests: Sequence[Request] | None = None) -> None:
    """Fit on `dataset`'s train split, then check output shape, types, order, `k` and the time rule.

    The time rule: nothing retrieved may be at or after the request's timestamp.
    """
    what = f"retriever {_label(retriever)!r}"
    requests = _fit_on_train(retriever, dataset, what, requests, {"train": 20, "test": 30})
    results = retriever.retrieve(requests, k)
    if not isinstance(results, list) or len(results) != len(requests):
        raise _fail(
            what,
            f"retrieve() returned {type(results).__name__} of length "
            f"{len(results) if hasattr(results, '__len__') else '?'} for {len(requests)} requests",
            "return a list with one list of Retrieved per request, in request order",
        )
    for request, found in zip(requests, results, strict=True):
        if len(found) > k:
            raise _fail(what, f"returned {len(found)} items for k={k}", "return at most k items per request")
        for item in found:
            if not isinstance(item, Retrieved):
                raise _fail(
                    what, f"returned {type(item).__name__}, not Retrieved", "wrap results in mhee_sdk.Retrieved"
                )
            if item.ts >= request.ts:
                raise _fail(
                    what,
                    f"request {request.request_id} (ts={request.ts}) got an interaction at ts={item.ts}",
                    "only use interactions strictly before the request: log.before(user, ts) / log.raters(item, ts)",
                )
        scores = [item.score for item in found]
        if scores != sorted(scores, reverse=True):
            raise _fail(
                what,
                f"scores for request {request.request_id} are not best-first: {scores}",
                "sort results by descending score",
            )
    if results != retriever.retrieve(requests, k):
        raise _fail(what, "two identical calls gave different results", "seed any randomness")
    if any(len(found) > 0 for found in retriever.retrieve(requests, 0)):
        raise _fail(what, "k=0 returned items", "return empty lists for k=0")


def _label(obj: Any) -> str:
    """A plugin object's name for messages: its `name` when it has one, else its class name."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) else type(obj).__name__


def _missing(obj: Any, protocol: type) -> list[str]:
    return [name for name in protocol_members(protocol) if not hasattr(obj, name)]


def check_exit_policy(policy: ExitPolicy, num_layers: int = 10, rows: int = 64, seed: int = 0) -> None:
    """Check `decide` returns one bool per row, is deterministic and decides each row on its own."""
    missing = _missing(policy, ExitPolicy)
    if missing:
        what = f"exit policy {type(policy).__name__!r}"
        raise _fail(what, f"lacks {', '.join(missing)}", "give it a `name` string and decide(layer, probs)")
    what = f"exit policy {policy.name!r}"
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, size=(rows, num_layers))
    for column in range(1, num_layers + 1):
        layer = 3 * column
        decision = policy.decide(layer, probs[:, :column])
        decision = np.asarray(decision)
        if decision.shape != (rows,) or decision.dtype != bool:
            raise _fail(
                what,
                f"decide() returned shape {decision.shape} dtype {decision.dtype} for {rows} rows",
                "return a numpy bool array with one entry per row",
            )
        if not np.array_equal(decision, np.asarray(policy.decide(layer, probs[:, :column].copy()))):
            raise _fail(what, "decide() is not deterministic", "depend only on (layer, probs)")
        subset = rng.permutation(rows)[: rows // 2]  # the engine calls decide on the rows still running
        if not np.array_equal(decision[subset], np.asarray(policy.decide(layer, probs[subset, :column]))):
            raise _fail(
                what,
                "a row's decision depends on the other rows in the batch",
                "decide each row from its own probs only (the engine drops finished rows)",
            )
        single = np.asarray(policy.decide(layer, probs[:1, :column]))
        if single.shape != (1,) or bool(single[0]) != bool(decision[0]):
            raise _fail(
                what,
                "a row's decision depends on the other rows in the batch (alone it decides differently)",
                "decide each row from its own probs only",
            )


def _head_input(head: Any, hidden_size: int, rows: int, seed: int) -> Any:
    """Random pooled hidden states ``[rows, hidden_size]`` on the head's device, with a few large dimensions."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator)
    hidden[:, : max(1, hidden_size // 32)] *= 20.0  # mid-layer states carry a few "massive activation" dims
    tensors = [*head.parameters(), *head.buffers()]
    return hidden.to(tensors[0].device) if tensors else hidden


def check_exit_head(
    head_factory: Callable[..., Any],
    hidden_size: int = 64,
    layer: int = 3,
    backbone: Any = None,
    rows: int = 16,
    feature_size: int | None = None,
    seed: int = 0,
    **params: Any,
) -> None:
    """Build a head as the SDK does and check its contract (``mhee_sdk.interfaces.ExitHead``).

    The factory is called as ``head_factory(hidden_size=..., layer=..., backbone=..., **params)``; the head
    must be a ``torch.nn.Module`` with ``layer``, ``trainable`` and ``needs_features`` attributes and
    ``logits(hidden, features=None)``, map ``[B, H]`` to P(like) ``[B]`` in [0, 1] with
    ``forward == sigmoid(logits)``, decide each row on its own and be deterministic in eval mode. Heads
    with ``needs_features = True`` also get collaborative features ``[B, feature_size]`` (default: the
    ``hybrid`` head's feature count).
    """
    import torch
    from torch import nn

    what = f"exit head {getattr(head_factory, '__name__', type(head_factory).__name__)!r}"
    try:
        head = head_factory(hidden_size=hidden_size, layer=layer, backbone=backbone, **params)
    except TypeError as err:
        raise _fail(
            what,
            f"factory(hidden_size=, layer=, backbone=) raised TypeError: {err}",
            "accept the keyword arguments hidden_size, layer and backbone (backbone may go unused)",
        ) from err
    what = f"exit head {type(head).__name__!r}"
    if not isinstance(head, nn.Module):
        raise _fail(what, f"is a {type(head).__name__}, not a torch.nn.Module", "subclass torch.nn.Module")
    if getattr(head, "layer", None) != layer:
        raise _fail(
            what,
            f"has layer={getattr(head, 'layer', '<missing>')!r}, expected {layer} (the factory's argument)",
            "store the layer it reads: self.layer = layer",
        )
    for flag, fix in (
        ("trainable", "set a class attribute trainable = True (False for heads that need no fitting)"),
        ("needs_features", "set a class attribute needs_features = False (True if it reads collaborative features)"),
    ):
        if not isinstance(getattr(head, flag, None), bool):
            raise _fail(what, f"has {flag}={getattr(head, flag, '<missing>')!r}, not a bool", fix)
    if head.trainable and not any(p.requires_grad for p in head.parameters()):
        raise _fail(
            what,
            "says trainable = True but has no parameters that require grad",
            "give it nn.Parameters (e.g. an nn.Linear), or set trainable = False",
        )
    if not callable(getattr(head, "logits", None)):
        raise _fail(
            what,
            "has no logits() method (training fits log-odds with BCEWithLogitsLoss; the engine reads forward)",
            "add logits(hidden, features=None) -> log-odds [B]; make forward return torch.sigmoid(self.logits(...))",
        )

    hidden = _head_input(head, hidden_size, rows, seed)
    features = None
    if head.needs_features:
        if feature_size is None:
            from mhee_sdk.exits.features import FEATURE_NAMES

            feature_size = len(FEATURE_NAMES)
        generator = torch.Generator().manual_seed(seed + 1)
        features = torch.randn(rows, feature_size, generator=generator).to(hidden.device)

    def call(method: Callable[..., Any], picked: torch.Tensor) -> Any:
        try:
            with torch.no_grad():
                return method(hidden[picked], None if features is None else features[picked])
        except TypeError as err:
            raise _fail(
                what,
                f"{getattr(method, '__name__', 'forward')}(hidden, features) raised TypeError: {err}",
                "accept a second argument features=None in forward and logits (ignore it if unused)",
            ) from err

    head.eval()
    everyone = torch.arange(rows, device=hidden.device)
    out = call(head, everyone)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(
            what,
            f"returned {shape} for a batch of {rows} rows, expected shape ({rows},)",
            "return a 1-D tensor with one P(like) per row (e.g. .squeeze(-1))",
        )
    values = out.float()
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise _fail(
            what,
            f"returned values outside [0, 1] (min {values.min().item():.4g}, max {values.max().item():.4g})",
            "return probabilities: torch.sigmoid of the log-odds",
        )
    if not torch.equal(out, call(head, everyone)):
        raise _fail(
            what,
            "two calls in eval mode gave different outputs",
            "use no randomness outside training (dropout is fine: eval() turns it off)",
        )
    subset = torch.as_tensor(np.random.default_rng(seed).permutation(rows)[: rows // 2], device=hidden.device)
    for picked, how in ((subset, "in a smaller batch"), (subset[:1], "alone")):
        if not torch.allclose(out[picked].float(), call(head, picked).float(), atol=1e-5, rtol=1e-4):
            raise _fail(
                what,
                f"a row's output changes when it is scored {how} (it depends on the other rows in the batch)",
                "compute each row from its own hidden state only (no batch statistics; the engine drops "
                "finished rows between layers)",
            )
    logits = call(head.logits, everyone)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (rows,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise _fail(what, f"logits() returned {shape}, expected ({rows},)", "return one log-odds value per row")
    if not torch.allclose(torch.sigmoid(logits.float()), values, atol=1e-5, rtol=1e-4):
        raise _fail(
            what,
            "forward() is not sigmoid(logits()): training fits logits, the engine reads forward",
            "make forward return torch.sigmoid(self.logits(hidden))",
        )


def check_backbone(backbone: Backbone, texts: Sequence[str] | None = None, atol: float = 1e-4) -> None:
    """Check a backbone against ``mhee_sdk.interfaces.Backbone``: attributes, shapes, compaction, determinism.

    Runs `texts` (default: four prompts of different lengths) through every layer; a row must give the
    same pooled state alone, in the batch, and after other rows were dropped mid-way (compaction).
    """
    import torch

    from mhee_sdk.interfaces import LayerState

    what = f"backbone {type(backbone).__name__!r}"
    missing = _missing(backbone, Backbone)
    if missing:
        raise _fail(what, f"lacks {', '.join(missing)}", "implement every member of mhee_sdk.interfaces.Backbone")
    for name, kind in (("name", str), ("fingerprint", str), ("num_layers", int), ("hidden_size", int),
                       ("device", torch.device), ("dtype", torch.dtype)):  # fmt: skip
        value = getattr(backbone, name)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1) or value == "":
            positive = "positive " if kind is int else ""
            raise _fail(what, f"has {name}={value!r}", f"make {name} a {positive}{kind.__name__}")
    texts = list(texts) if texts is not None else [
        "User: 24-year-old technician.\nCandidate: a comedy.", "short", "A somewhat longer prompt " * 4, "x y",
    ]  # fmt: skip
    count = backbone.count_tokens(texts[0])
    if not isinstance(count, int) or count < 1:
        raise _fail(what, f"count_tokens() returned {count!r}", "return the number of tokens as a positive int")

    def run(batch: Sequence[str], keep_after: int | None = None, keep: Sequence[int] = ()) -> torch.Tensor:
        state = backbone.start(batch)
        if not isinstance(state, LayerState) or state.layers_done != 0:
            raise _fail(what, "start() did not return a LayerState with layers_done=0", "return LayerState(...)")
        for layer in range(1, backbone.num_layers + 1):
            if keep_after is not None and layer == keep_after + 1:
                state = state.select(torch.as_tensor(list(keep), device=state.hidden.device))
            state = backbone.step(state)
            if state.layers_done != layer:
                raise _fail(what, f"step() left layers_done={state.layers_done} after layer {layer}",
                            "return replace(state, hidden=..., layers_done=state.layers_done + 1)")  # fmt: skip
        pooled = backbone.pooled(state)
        if tuple(pooled.shape) != (state.batch_size, backbone.hidden_size):
            raise _fail(what, f"pooled() returned {tuple(pooled.shape)}, expected "
                        f"({state.batch_size}, {backbone.hidden_size})", "return [B, hidden_size]")  # fmt: skip
        if not torch.isfinite(pooled.float()).all():
            raise _fail(what, "pooled() returned NaN or inf", "check the layers and the padding mask")
        return pooled.float()

    with torch.inference_mode():
        state = backbone.start(texts)
        for name, tensor in {"hidden": state.hidden, "mask": state.mask, **state.extras}.items():
            if tensor.shape[0] != len(texts):
                problem = f"start() put {name} with first dimension {tensor.shape[0]} for {len(texts)} prompts"
                raise _fail(what, problem, "keep the batch as the first dimension of every tensor in the state")
        if state.hidden.dtype != backbone.dtype:
            raise _fail(what, f"start() gave hidden states of {state.hidden.dtype}, but dtype={backbone.dtype}",
                        "compute in the dtype the backbone states")  # fmt: skip
        full = run(texts)
        if not torch.equal(full, run(texts)):
            raise _fail(what, "two identical runs gave different pooled states", "use no randomness in inference")
        for row, text in enumerate(texts):
            if not torch.allclose(run([text])[0], full[row], atol=atol, rtol=1e-4):
                raise _fail(what, f"row {row} differs alone and in a batch (padding changes it)",
                            "mask padding and count positions over real tokens only")  # fmt: skip
        keep = [len(texts) - 1, 0]
        compacted = run(texts, keep_after=max(1, backbone.num_layers // 2), keep=keep)
        if not torch.allclose(compacted, full[keep], atol=atol, rtol=1e-4):
            fix = "put every per-row tensor in LayerState (batch first) so select() keeps them aligned"
            raise _fail(what, "rows dropped mid-way (LayerState.select) change the rows kept", fix)
        state = backbone.start(texts[:1])
        for _ in range(backbone.num_layers):
            state = backbone.step(state)
        refused = False
        try:
            backbone.step(state)
        except ValueError:
            refused = True  # what the contract asks for
        if not refused:
            raise _fail(what, "step() ran past the last layer", "raise ValueError once all layers ran")


def check_baseline(baseline: Any, dataset: Any, requests: Sequence[Request] | None = None) -> None:
    """Fit on `dataset`'s train split, then check that `score` gives one finite, deterministic float per request.

    A request's score must not depend on the other requests scored with it.
    """
    what = f"baseline {_label(baseline)!r}"
    requests = _fit_on_train(baseline, dataset, what, requests, {"valid": 20, "test": 40})
    raw = baseline.score(requests)
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _fail(
            what, f"score() returned {type(raw).__name__} that is not numeric ({err})", "return a numpy float array"
        ) from err
    if scores.shape != (len(requests),):
        raise _fail(
            what,
            f"score() returned shape {scores.shape} for {len(requests)} requests",
            "return a numpy array with one float per request, in request order",
        )
    bad = [r.request_id for r, s in zip(requests, scores, strict=True) if not np.isfinite(s)]
    if bad:
        raise _fail(
            what,
            f"score() returned NaN or inf for requests {bad[:5]}",
            "give users and items it has not seen a finite fallback score (e.g. the training like-rate)",
        )
    if not np.array_equal(scores, np.asarray(baseline.score(requests), dtype=np.float64)):
        raise _fail(what, "two identical score() calls gave different results", "seed any randomness")
    subset = np.random.default_rng(0).permutation(len(requests))[: len(requests) // 2]
    alone = np.asarray(baseline.score([requests[i] for i in subset]), dtype=np.float64)
    if alone.shape != scores[subset].shape or not np.allclose(alone, scores[subset], rtol=1e-6, atol=1e-9):
        raise _fail(
            what,
            "a request's score depends on the other requests scored with it",
            "score each request on its own (no normalising over the batch)",
        )


def synthetic_full_depth_run(store, requests: int, layers: Sequence[int], seed: int = 0, users: int = 50) -> str:
    """Log a finished full-depth run of `requests` synthetic requests in `store`; returns its run id.

    Every exit layer's head outputs P(like) = sigmoid(signal * label-sign + noise), the signal growing
    from 0.2 at the first exit layer to 1.5 at the last: heads that get more accurate with depth.
    """
    import pandas as pd

    from mhee_sdk.metrics import auc

    layers = [int(layer) for layer in layers]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, requests)
    signal = (2 * labels - 1)[:, None] * np.linspace(0.2, 1.5, len(layers))[None, :]
    probs = 1 / (1 + np.exp(-(signal + rng.normal(0, 1, (requests, len(layers))))))
    with store.recording({"policy": "never"}, layers, layers[-1], name="full") as run_id:
        store.append(run_id, "predictions", pd.DataFrame({
            "request_id": np.arange(requests), "user": rng.integers(0, users, requests),
            "item": rng.integers(0, 100, requests), "label": labels, "prob": probs[:, -1], "exit_layer": layers[-1],
            "latency_s": 0.1}))  # fmt: skip
        store.append(run_id, "layer_outputs", pd.DataFrame({
            "request_id": np.repeat(np.arange(requests), len(layers)), "layer": np.tile(layers, requests),
            "head": "linear", "prob": probs.ravel()}))  # fmt: skip
        store.add_metrics(run_id, {"auc": auc(labels, probs[:, -1])})
    return run_id
