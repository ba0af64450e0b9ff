"""Fine-tuned adapters as objects: LoRA weights and collaborative soft tokens, saved under ``$MHEE_HOME/adapters``.

An [`Adapter`][mhee_sdk.adapters.Adapter] is made by ``mhee_sdk.finetune`` and handed to a backbone when it is built
(``HFBackbone(..., adapter=load_adapter("demo"))``, or the backbone parameter ``adapter = "demo"``), so a
backbone's name and fingerprint say from construction on which weights it runs. Nothing sets an
adapter on a backbone afterwards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mhee_sdk import assets


class SoftTokens(nn.Module):
    """``[B, source_dim]`` collaborative vectors -> ``[B, count, hidden_size]`` input embeddings (as in CoLLM)."""

    def __init__(self, source_dim: int, hidden_size: int, count: int = 2, width: int = 256) -> None:
        super().__init__()
        self.count, self.hidden_size, self.source_dim = count, hidden_size, source_dim
        self.net = nn.Sequential(nn.Linear(source_dim, width), nn.GELU(), nn.Linear(width, count * hidden_size))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net(vectors.float()).view(len(vectors), self.count, self.hidden_size)


@dataclass(frozen=True)
class Adapter:
    """A saved fine-tuning result: LoRA settings and weights (or none), soft tokens (or none), its record.

    digest: a hash of the weight files, part of the adapted backbone's fingerprint.
    """

    name: str
    record: dict[str, Any]
    lora_weights: dict[str, torch.Tensor] = field(repr=False)
    soft_tokens: SoftTokens | None = field(repr=False)
    digest: str = ""

    @property
    def lora(self) -> dict[str, Any] | None:
        """LoRA settings (rank, alpha, target_modules), or None for a soft-tokens-only adapter."""
        settings = self.record["config"]
        if not settings["lora"]:
            return None
        targets = list(settings["target_modules"])
        return {"r": settings["rank"], "lora_alpha": settings["alpha"], "target_modules": targets}

    def apply_lora(self, model: nn.Module) -> None:
        """Inject this adapter's LoRA layers into `model` (a freshly loaded base model) and load their weights."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora is None:
            return
        inject_adapter_in_model(LoraConfig(**self.lora), model)
        result = model.load_state_dict(self.lora_weights, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"adapter {self.name!r} does not fit this model: unexpected {result.unexpected_keys[:3]}")


def adapter_dir(name: str) -> Path:
    """Where adapter `name` lives: ``$MHEE_HOME/adapters/<name>``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"adapter name {name!r} must be a plain folder name")
    return assets.home() / "adapters" / name


def adapter_exists(name: str) -> bool:
    """True when adapter `name` has been saved (its ``adapter.json`` exists)."""
    return (adapter_dir(name) / "adapter.json").is_file()


def save_adapter(
    name: str,
    lora_weights: dict[str, torch.Tensor],
    soft_tokens: SoftTokens | None,
    record: dict[str, Any],
) -> Path:
    """Write LoRA weights, soft tokens and the record (settings, losses, provenance); returns the folder."""
    from safetensors.torch import save_file

    folder = adapter_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora_weights.items()}, folder / "lora.safetensors")
    soft_file = folder / "soft.safetensors"
    if soft_tokens is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in soft_tokens.state_dict().items()}, soft_file)
        record = {**record, "soft_tokens": {"source_dim": soft_tokens.source_dim, "count": soft_tokens.count}}
    else:
        soft_file.unlink(missing_ok=True)
        record = {**record, "soft_tokens": None}
    (folder / "adapter.json").write_text(json.dumps(record, indent=2))
    return folder


def load_adapter(name: str) -> Adapter:
    """Read saved adapter `name`; raises FileNotFoundError listing the saved ones."""
    from safetensors.torch import load_file

    folder = adapter_dir(name)
    if not (folder / "adapter.json").is_file():
        available = sorted(p.name for p in folder.parent.glob("*") if (p / "adapter.json").is_file())
        raise FileNotFoundError(
            f"adapter {name!r} not found in {folder.parent}; available: {', '.join(available) or 'none'} "
            "(create one with `mhee finetune`)"
        )
    record = json.loads((folder / "adapter.json").read_text())
    digest = hashlib.sha256((folder / "lora.safetensors").read_bytes())
    soft = None
    if record["soft_tokens"]:
        spec = record["soft_tokens"]
        weights = load_file(folder / "soft.safetensors")
        digest.update((folder / "soft.safetensors").read_bytes())
        hidden_size = int(weights["net.2.weight"].shape[0]) // int(spec["count"])
        soft = SoftTokens(spec["source_dim"], hidden_size, spec["count"])
        soft.load_state_dict(weights)
        soft.eval()
    return Adapter(name, record, load_file(folder / "lora.safetensors"), soft, digest.hexdigest()[:12])
