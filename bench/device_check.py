"""The GPU check, prepared to run once on a lent CUDA machine in under 5 minutes (see bench/device_check.sh).

    python bench/device_check.py [--smollm2 PATH]

1. Agreement: the same prompts and exit heads through the engine on ``cuda`` in bfloat16 and on the
   CPU in float32 (tiny backbone; SmolLM2 too when its converted folder is given): the share of
   requests with the same exit layer, and the largest difference in P(like), for a full-depth run and
   an early-exit policy.
2. Speed on the GPU in bfloat16: full depth vs early exit at batch 1, 32 and 128, interleaved repeats,
   with each policy's realised share of its ideal speedup (layers / mean exit layer).

It needs torch, transformers and numpy only (no store, no data files): prompts are synthetic text.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mhee_sdk.backbones.hf import HFBackbone
from mhee_sdk.backbones.tiny import tiny_backbone
from mhee_sdk.engine import EarlyExitEngine
from mhee_sdk.exits.heads import build_heads
from mhee_sdk.exits.policies import MaxProb, Never, Patience
from mhee_sdk.registry import Registry

WORDS = ["comedy", "drama", "thriller", "user", "liked", "rated", "movie", "candidate", "similar", "older",
         "younger", "technician", "writer"]  # fmt: skip


def prompts(count: int, seed: int = 0) -> list[str]:
    """Synthetic prompts of 20-120 words (lengths vary, so batches are padded)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) for _ in range(count)]


def spread_heads(backbone, texts: list[str], registry: Registry, seed: int = 0):
    """Linear heads on every 3rd layer fitted to spread P(like) over (0, 1), so policies exit at many depths."""
    heads = build_heads("linear", backbone, registry=registry, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        state = backbone.start(texts[:64])
        for layer in range(1, heads.layers[-1] + 1):
            state = backbone.step(state)
            if layer in heads:
                pooled = backbone.pooled(state).float()
                heads[layer].fit_inputs(pooled, None)
                weight = torch.randn(1, backbone.hidden_size, generator=generator) * 0.15
                heads[layer].linear.weight.copy_(weight.to(pooled.device))
    return heads


def agreement(name: str, build, texts: list[str], registry: Registry) -> None:
    """Exit layers and P(like) of cuda-bf16 vs cpu-fp32 on the same prompts and the same head weights."""
    cpu = build("cpu", "float32")
    heads = spread_heads(cpu, texts, registry)
    gpu = build("cuda", "bfloat16")
    gpu_heads = build_heads("linear", gpu, registry=registry)
    gpu_heads.load_state_dict(heads.state_dict())
    gpu_heads.to(gpu.device)
    for policy in (Never(), MaxProb(threshold=0.75), Patience(patience=2)):
        a = EarlyExitEngine(cpu, heads, policy).run(texts, batch_size=32, progress=False)
        b = EarlyExitEngine(gpu, gpu_heads, policy).run(texts, batch_size=32, progress=False)
        same = np.mean([x.exit_layer == y.exit_layer for x, y in zip(a, b, strict=True)])
        diff = max(abs(x.prob - y.prob) for x, y in zip(a, b, strict=True))
        print(f"{name:<14}{policy.name:<12} same exit layer {same:7.1%}   max |P(cuda bf16) - P(cpu fp32)| {diff:.4f}")


def speed(name: str, backbone, texts: list[str], registry: Registry, repeats: int = 3) -> None:
    """Full depth vs early exit on the GPU, interleaved, at batch 1, 32 and 128."""
    heads = spread_heads(backbone, texts, registry)
    policies = {"full depth": Never(), "max-prob 0.75": MaxProb(threshold=0.75), "patience 2": Patience(patience=2)}
    for batch_size in (1, 32, 128):
        batch_texts = texts[: max(64, 2 * batch_size)] if batch_size > 1 else texts[:64]
        seconds: dict[str, list[float]] = {label: [] for label in policies}
        exits: dict[str, float] = {}
        for policy in policies.values():  # warm-up (CUDA kernels, allocator)
            engine = EarlyExitEngine(backbone, heads, policy)
            engine.run(batch_texts[:batch_size], batch_size=batch_size, progress=False)
        for _ in range(repeats):
            for label, policy in policies.items():
                torch.cuda.synchronize()
                started = time.perf_counter()
                out = EarlyExitEngine(backbone, heads, policy).run(batch_texts, batch_size=batch_size, progress=False)
                torch.cuda.synchronize()
                seconds[label].append(time.perf_counter() - started)
                exits[label] = float(np.mean([p.exit_layer for p in out]))
        full = statistics.median(seconds["full depth"])
        for label in policies:
            ideal = backbone.num_layers / exits[label]
            measured = full / statistics.median(seconds[label])
            per_request = 1000 * statistics.median(seconds[label]) / len(batch_texts)
            print(f"{name:<14}batch {batch_size:<4}{label:<15}{per_request:8.2f} ms/request  "
                  f"mean exit {exits[label]:5.1f}  ideal {ideal:5.2f}x  measured {measured:5.2f}x  "
                  f"realised {measured / ideal:6.1%}")  # fmt: skip


def main() -> None:
    """Run both checks for the tiny backbone and, when given, SmolLM2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", default=None, help="folder of the converted SmolLM2-135M (safetensors)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a lent GPU machine only")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    registry = Registry(load_entry_points=False)
    texts = prompts(256)
    builders = {"tiny": lambda device, dtype: tiny_backbone(device=device, dtype=dtype)}
    if args.smollm2:
        builders["smollm2-135m"] = lambda device, dtype: HFBackbone.from_pretrained(
            args.smollm2, name="smollm2-135m", device=device, dtype=dtype
        )
    for name, build in builders.items():
        agreement(name, build, texts[:128], registry)
    for name, build in builders.items():
        speed(name, build("cuda", "bfloat16"), texts, registry)


if __name__ == "__main__":
    main()
