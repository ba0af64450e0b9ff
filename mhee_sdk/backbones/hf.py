"""A transformers causal LM run one decoder layer at a time (Llama-family: Llama, SmolLM2, Mistral, Qwen2/3).

The loop is the model's own ``forward`` unrolled: embed, rotary tables, a causal mask, then
``layer(hidden, attention_mask, position_embeddings, position_ids)`` per layer. Prompts are left
padded, so every row's last real token sits in the last column; positions count real tokens only, so
a row's result does not depend on how much padding its batch needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mhee_sdk import assets
from mhee_sdk.adapters import Adapter, load_adapter
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import LayerState

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``, ``float16``); None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; choose from: {', '.join(DTYPES)}")


class HFBackbone:
    """Layer-by-layer wrapper around a transformers ``*ForCausalLM`` (Llama-style decoder).

    Args:
        model: the causal LM (its ``.model`` needs ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
        tokenizer: its tokenizer; a chat template, when present, wraps each prompt.
        name: registry name, used in fingerprints and reports.
        device: default CUDA when available, else CPU.
        dtype: precision of the weights and hidden states (default float32).
        fingerprint: identifies the weights (default: a hash of the model config); the adapter and dtype are added.
        adapter: a fine-tuned adapter (``mhee_sdk.adapters.load_adapter``) applied to the model at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        fingerprint: str | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, attr) for attr in needed):
            raise TypeError(
                f"{type(model).__name__} is not a Llama-style causal LM (needs model.{', model.'.join(needed)}); "
                "the hf backbone supports Llama, SmolLM2, Mistral and Qwen2/3 models"
            )
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype)
        self.adapter = adapter
        if adapter is not None:
            adapter.apply_lora(model)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.base = base
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        fingerprint = fingerprint or f"{name}:{_config_digest(model)}"
        if self.dtype != torch.float32:  # float32 keeps the fingerprints (and caches) of earlier versions
            fingerprint += f":{str(self.dtype).removeprefix('torch.')}"
        if adapter is not None:
            name, fingerprint = f"{name}+lora:{adapter.name}", f"{fingerprint}+lora:{adapter.name}:{adapter.digest}"
        self.name = name
        self.fingerprint = fingerprint
        self.rows_evaluated = 0  # decoder-layer row evaluations, for tests and benchmarks

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        adapter: Adapter | None = None,
    ) -> HFBackbone:
        """Load from a local folder or the local HF cache; never downloads (``local_files_only``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, trust_remote_code=False
            )
        except OSError as err:
            raise FileNotFoundError(
                f"model {str(path)!r} is not a local folder or in the local Hugging Face cache; mhee never "
                "downloads models at run time. Pass a folder path, or use the built-in 'smollm2-135m' "
                "(`mhee assets install`)."
            ) from err
        label = name or str(path)
        manifest = Path(path) / ".complete.json"  # written by `mhee assets install`: holds the weights' hash
        digest = json.loads(manifest.read_text())["model.safetensors"][:16] if manifest.is_file() else None
        fingerprint = f"{label}:{digest}" if digest else None
        return cls(model, tokenizer, name=label, device=device, dtype=dtype, fingerprint=fingerprint, adapter=adapter)

    def __repr__(self) -> str:
        return (
            f"HFBackbone({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})"
        )

    # -------------------------------------------------------------- text
    def format(self, text: str, system: str | None = None) -> str:
        """Wrap a prompt in the chat template (if the tokenizer has one), ready for the answer token."""
        if not self.tokenizer.chat_template:
            return text + "\nAnswer:"
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (the chat template adds `template_tokens` on top)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def template_tokens(self, system: str | None = None) -> int:
        """Tokens the chat template (with this system message) adds around a prompt."""
        return len(self.tokenizer(self.format("", system), add_special_tokens=False)["input_ids"])

    def answer_token_ids(self, words: Sequence[str] = ("Yes", "No")) -> list[int]:
        """First token id of each answer word as the model would write it after the prompt."""
        return [self.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words]

    # -------------------------------------------------------------- layers
    def start(
        self, texts: Sequence[str], prefix: torch.Tensor | None = None, system: str | None = None
    ) -> LayerState:
        """Tokenize (left padding) and embed: the state before decoder layer 1.

        prefix: optional ``[B, S, H]`` input embeddings placed before each prompt (collaborative soft
        tokens). Padding then sits between prefix and prompt; it is masked, and positions count real
        tokens only, so each row is computed as if it had no padding. system: the chat system message.
        """
        if not texts:
            raise ValueError("start() needs at least one prompt")
        batch = self.tokenizer(
            [self.format(t, system) for t in texts], padding=True, return_tensors="pt", add_special_tokens=False
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.base.embed_tokens(ids)  # [B, T, H]
        if prefix is not None:
            if prefix.shape[0] != len(texts) or prefix.shape[2] != self.hidden_size:
                raise ValueError(f"prefix must be [{len(texts)}, S, {self.hidden_size}], got {tuple(prefix.shape)}")
            hidden = torch.cat([prefix.to(device=self.device, dtype=hidden.dtype), hidden], dim=1)
            mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=self.device), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: real tokens count 0, 1, 2, ...
        cos, sin = self.base.rotary_emb(hidden, positions)
        extras = {"cos": cos, "sin": sin, "positions": positions}
        if not bool(mask.all()):
            # Without padding no mask is needed: attention then takes the faster built-in causal path.
            # Rows removed later keep whichever form their batch started with; both give the same result.
            extras["attn"] = _additive_mask(mask, hidden.dtype)
        return LayerState(hidden=hidden, mask=mask, extras=extras)

    def step(self, state: LayerState) -> LayerState:
        """Run decoder layer ``state.layers_done + 1`` on every row of the batch."""
        if state.layers_done >= self.num_layers:
            raise ValueError(f"all {self.num_layers} layers already ran")
        layer = self.base.layers[state.layers_done]
        out = layer(
            state.hidden,
            attention_mask=state.extras.get("attn"),
            position_embeddings=(state.extras["cos"], state.extras["sin"]),
            position_ids=state.extras["positions"],
        )
        self.rows_evaluated += state.batch_size
        hidden = out[0] if isinstance(out, tuple) else out
        return replace(state, hidden=hidden, layers_done=state.layers_done + 1)

    def pooled(self, state: LayerState) -> torch.Tensor:
        """Hidden state of each row's last real token, ``[B, H]`` (left padding puts it last)."""
        return state.hidden[:, -1, :]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm (what its LM head reads)."""
        return self.base.norm(hidden)

    def lm_head_rows(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Rows of the LM head for the given tokens, ``[len(token_ids), H]`` (a copy)."""
        return self.model.get_output_embeddings().weight[list(token_ids)].detach().clone()

    def final_norm_module(self) -> nn.Module:
        """The final norm module itself (heads copy it)."""
        return self.base.norm


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, T, T]`` additive mask: causal, real keys only; padding queries see themselves (no NaNs)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]  # [B, T(query), T(key)]
    allowed |= torch.eye(length, dtype=torch.bool, device=mask.device)[None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return additive[:, None]


def _config_digest(model: nn.Module) -> str:
    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _adapter(adapter: str | Adapter | None) -> Adapter | None:
    return load_adapter(adapter) if isinstance(adapter, str) else adapter


def smollm2_135m(
    device: str | None = None, dtype: str | None = None, adapter: str | Adapter | None = None
) -> HFBackbone:
    """SmolLM2-135M-Instruct from the local asset cache (30 layers, hidden 576); `adapter`: a saved adapter's name."""
    return HFBackbone.from_pretrained(
        assets.model_dir(assets.SMOLLM2), name="smollm2-135m", device=device, dtype=dtype, adapter=_adapter(adapter)
    )


def hf_model(spec: str, device: str | None = None, dtype: str | None = None, adapter: str | None = None) -> HFBackbone:
    """A causal LM from a local folder or the local HF cache: ``hf:<path or id>``."""
    return HFBackbone.from_pretrained(spec, name=f"hf:{spec}", device=device, dtype=dtype, adapter=_adapter(adapter))


def smollm2_135m_lora(spec: str, device: str | None = None, dtype: str | None = None) -> HFBackbone:
    """SmolLM2-135M with the fine-tuned adapter ``$MHEE_HOME/adapters/<spec>`` (made by ``mhee finetune``)."""
    return smollm2_135m(device=device, dtype=dtype, adapter=spec)


@hookimpl
def register_backbones(register) -> None:
    register("smollm2-135m", smollm2_135m)
    register("smollm2-135m+lora:", smollm2_135m_lora)
    register("hf:", hf_model)
