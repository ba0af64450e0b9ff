"""Recommendation quality: classic baselines vs LLM configurations, on exactly the same test requests.

    python bench/quality.py [--train 600 --valid 300 --test 400] [--big 5000] [--adapter NAME ...]
    python bench/quality.py --backbone tiny --train 40 --valid 30 --test 40 --prompt-tokens 300  # a quick check
    python bench/quality.py --backbone gemma3-270m --train 100 --valid 60 --test 100  # the optional second model

Rows: baselines (no LLM), then LLM configurations (prompt x head). Columns: AUC / GAUC / LogLoss of
the head at its best layer (chosen on validation, reported on test) and at the last layer, and the
early-exit AUC at >= 2x ideal speedup: among fixed-layer, max-prob, patience and calibrated policies,
the one with the best *validation* AUC whose validation layer savings are >= 2, replayed on test.
Then the cold-start slices (``mhee_sdk.data.split``): AUC on the test requests whose item / user has
fewer than 5 training ratings (at the best layer for LLM rows); the header gives their counts.
Hidden states come from the cache (`collect_hidden`), so re-running is cheap.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.exits.policies import Calibrated, FixedLayer, MaxProb, Patience, replay
from mhee_sdk.metrics import quality, sliced_quality

GCN = {"mode": "users", "progress": False}
CONFIGS = [
    ("zero-shot verbalizer, recent-10 prompt", dict(retriever="recent", head="verbalizer")),
    ("frozen linear probe, recent-10 prompt", dict(retriever="recent", head="linear")),
    ("frozen linear probe, GCN similar-users prompt", dict(retriever="gcn", retriever_params=GCN, head="linear")),
    ("hybrid head, recent-10 prompt", dict(retriever="recent", head="hybrid", head_params={"rank": 8})),
    ("hybrid head, GCN similar-users prompt", dict(retriever="gcn", retriever_params=GCN, head="hybrid",
                                                   head_params={"rank": 8})),
]  # fmt: skip
BASELINES = ["popularity", "gcn-score", "logistic", "collab-logistic"]


COLD = ("cold_items", "cold_users")


def outputs(experiment: Experiment, split: str, n: int) -> tuple[np.ndarray, np.ndarray, list[int], list]:
    """Per-layer head outputs ``[N, L]``, labels, users and the requests of a seeded sample of a split."""
    hidden, labels, extra = experiment.features(split, n)
    requests = experiment.dataset.requests(split, limit=n, seed=experiment.config.seed)
    users = [r.user for r in requests]
    device = experiment.backbone.device
    extra = None if extra is None else torch.as_tensor(extra, device=device)
    with torch.no_grad():
        columns = [
            experiment.heads.predict(layer, torch.as_tensor(np.asarray(hidden[:, j], np.float32), device=device), extra)
            for j, layer in enumerate(experiment.heads.layers)
        ]
    return torch.stack(columns, 1).double().cpu().numpy(), labels, users, requests


def cold_cells(metrics: dict[str, float]) -> str:
    """The cold-item and cold-user AUC columns of a row."""
    return "".join(f"{metrics[f'auc@{name}']:>10.3f}" for name in COLD)


def early_exit(valid, test, layers, num_layers):
    """Best-on-validation policy with >= 2x validation layer savings; its test AUC and savings."""
    (pv, yv, _, _), (pt, yt, ut, _) = valid, test
    candidates = [FixedLayer(layer=x) for x in layers if num_layers / x >= 2]
    candidates += [MaxProb(threshold=t) for t in np.arange(0.55, 1.0, 0.05)]
    candidates += [Patience(patience=p) for p in (1, 2, 3)]
    candidates.append(Calibrated(budget=0.005).calibrate(pv, yv, layers))
    best = None
    for policy in candidates:
        on_valid = replay(policy, pv, layers)
        savings = num_layers / on_valid.layer.mean()
        score = quality(yv, on_valid.prob, np.zeros(len(yv)))["auc"]
        if savings >= 2 and (best is None or score > best[0]):
            best = (score, policy)
    if best is None:
        return float("nan"), float("nan"), "-"
    on_test = replay(best[1], pt, layers)
    return quality(yt, on_test.prob, ut)["auc"], num_layers / on_test.layer.mean(), best[1].name


def main() -> None:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--valid", type=int, default=300)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--big", type=int, default=0, help="also train the best configuration on this many requests")
    parser.add_argument("--adapter", nargs="*", default=[], help="fine-tuned adapters to add (mhee finetune)")
    parser.add_argument("--backbone", default="smollm2-135m", help="e.g. tiny: check the script in seconds")
    parser.add_argument("--prompt-tokens", type=int, default=160, help="prompt budget (tiny counts bytes: 300)")
    args = parser.parse_args()
    sizes = dict(train_requests=args.train, valid_requests=args.valid, eval_requests=args.test, k=10,
                 prompt_tokens=args.prompt_tokens, backbone=args.backbone)  # fmt: skip
    configs = list(CONFIGS)
    if args.big:
        configs.append((f"hybrid head, GCN prompt, {args.big} train requests",
                        dict(CONFIGS[-1][1], train_requests=args.big)))  # fmt: skip
    for name in args.adapter:
        configs.append((f"hybrid head, GCN prompt, adapter {name}",
                        dict(CONFIGS[-1][1], backbone=f"smollm2-135m+lora:{name}")))  # fmt: skip

    first = Experiment(RunConfig(**sizes, retriever="gcn", retriever_params=GCN, head="linear"), progress=False)
    requests = first.requests("test", args.test)
    counts = {name: int(mask.sum()) for name, mask in first.slices.masks(requests).items()}
    print(f"MovieLens-100K, {args.test} test requests (seed 0); heads trained on {args.train} train requests, "
          f"best layer and policies chosen on {args.valid} valid requests; {args.backbone}; cold (< "
          f"{first.slices.threshold} training ratings): {counts['cold_items']} requests of cold items, "
          f"{counts['cold_users']} of cold users")  # fmt: skip
    print(f"{'configuration':<52}{'AUC':>7}{'GAUC':>7}{'LogLoss':>8}{'layer':>6}{'last AUC':>9}{'last LL':>8}"
          f"{'EE AUC':>8}{'EE spd':>7}  {'EE policy':<26}{'cold item':>10}{'cold user':>10}")  # fmt: skip
    blank = f"{'':>32}  {'':<26}"  # the LLM-only columns of a baseline row
    for baseline in BASELINES:
        m = first.run_baseline(baseline, requests=requests).metrics
        print(f"{baseline + ' (no LLM)':<52}{m['auc']:>7.3f}{m['gauc']:>7.3f}{m['logloss']:>8.3f}{'-':>6}{blank}"
              f"{cold_cells(m)}")  # fmt: skip
    if args.big:  # the same amount of training signal for the strongest no-LLM baseline
        m = first.run_baseline("collab-logistic", {"train_requests": args.big}, requests=requests).metrics
        label = f"collab-logistic (no LLM), {args.big} train requests"
        print(f"{label:<52}{m['auc']:>7.3f}{m['gauc']:>7.3f}{m['logloss']:>8.3f}{'-':>6}{blank}{cold_cells(m)}")
    loaded = {}  # one backbone per name, shared by the rows (Gemma 3 takes 10-60 s to load on 2 cores)
    for label, overrides in configs:
        experiment = Experiment(RunConfig(**{**sizes, **overrides}), progress=False)
        if experiment.config.backbone in loaded:
            experiment.__dict__["backbone"] = loaded[experiment.config.backbone]  # the cached_property's slot
        loaded[experiment.config.backbone] = experiment.backbone
        experiment.fit_heads()
        layers, num_layers = experiment.heads.layers, experiment.backbone.num_layers
        valid = outputs(experiment, "valid", args.valid)
        test = outputs(experiment, "test", args.test)
        valid_auc = [quality(valid[1], valid[0][:, j], valid[2])["auc"] for j in range(len(layers))]
        j = int(np.nanargmax(valid_auc))
        at_best = quality(test[1], test[0][:, j], test[2])
        last = quality(test[1], test[0][:, -1], test[2])
        ee_auc, ee_speed, ee_name = early_exit(valid, test, layers, num_layers)
        cold = sliced_quality(test[1], test[0][:, j], test[2], experiment.slices.masks(test[3]))
        print(f"{label[:51]:<52}{at_best['auc']:>7.3f}{at_best['gauc']:>7.3f}{at_best['logloss']:>8.3f}"
              f"{layers[j]:>6}{last['auc']:>9.3f}{last['logloss']:>8.3f}{ee_auc:>8.3f}{ee_speed:>6.1f}x  "
              f"{ee_name:<26}{cold_cells(cold)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
