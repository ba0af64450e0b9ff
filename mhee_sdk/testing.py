"""Conformance checks for plugin authors: does my retriever / exit head / exit policy keep the contract?

Call them from your plugin's tests; each raises ``ContractError`` with a message that says what to fix::

    from mhee_sdk.testing import check_exit_policy
    def test_my_policy_conforms():
        check_exit_policy(MyPolicy())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mhee_sdk.types import Request, Retrieved


class ContractError(AssertionError):
    """An implementation breaks the interface contract; the message says how."""


def _fail(what: str, problem: str, fix: str) -> ContractError:
    return ContractError(f"{what}: {problem}. Fix: {fix}")


def check_retriever(retriever, dataset, k: int = 5, requests: Sequence[Request] | None = None) -> None:
    """Fit on `dataset`'s train split, then check output shape, types, order, `k` and the time rule.

    The time rule: nothing retrieved may be at or after the request's timestamp.
    """
    what = f"retriever {getattr(retriever, 'name', type(retriever).__name__)!r}"
    tables = dataset.load()
    fitted = retriever.fit(tables.split("train"), dataset.log)
    if fitted is not retriever:
        raise _fail(what, "fit() did not return self", "end fit() with `return self`")
    requests = (
        list(requests)
        if requests is not None
        else [
            *dataset.requests("train", limit=20, seed=1),
            *dataset.requests("test", limit=30, seed=1),
        ]
    )
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


def check_exit_policy(policy, num_layers: int = 10, rows: int = 64, seed: int = 0) -> None:
    """Check `decide` returns one bool per row, is deterministic and decides each row on its own."""
    what = f"exit policy {getattr(policy, 'name', type(policy).__name__)!r}"
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
