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
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import LayerState

SYSTEM_PROMPT = "You are a movie recommender. Answer with Yes or No."


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HFBackbone:
    """Layer-by-layer wrapper around a transformers ``*ForCausalLM`` (Llama-style decoder).

    Args:
        model: the causal LM (its ``.model`` needs ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
        tokenizer: its tokenizer; a chat template, when present, wraps each prompt.
        name: registry name, used in fingerprints and reports.
        device: default CUDA when available, else CPU.
        system_prompt: system message for chat templates (None: the template's default).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str,
        device: str | torch.device | None = None,
        system_prompt: str | None = SYSTEM_PROMPT,
        fingerprint: str | None = None,
    ) -> None:
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, attr) for attr in needed):
            raise TypeError(
                f"{type(model).__name__} is not a Llama-style causal LM (needs model.{', model.'.join(needed)}); "
                "the hf backbone supports Llama, SmolLM2, Mistral and Qwen2/3 models"
            )
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.base = base
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name
        self.system_prompt = system_prompt
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.fingerprint = fingerprint or f"{name}:{_config_digest(model)}"
        self.rows_evaluated = 0  # decoder-layer row evaluations, for tests and benchmarks

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, name: str | None = None, device: str | torch.device | None = None, **kwargs
    ) -> HFBackbone:
        """Load from a local folder or the local HF cache; never downloads (``local_files_only``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
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
        return cls(model, tokenizer, name=label, device=device, fingerprint=fingerprint, **kwargs)

    # -------------------------------------------------------------- text
    def format(self, text: str) -> str:
        """Wrap a prompt in the chat template (if the tokenizer has one), ready for the answer token."""
        if not getattr(self.tokenizer, "chat_template", None):
            return text + "\nAnswer:"
        messages = [{"role": "user", "content": text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (the chat template adds `template_tokens` on top)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def template_tokens(self) -> int:
        """Tokens the chat template adds around a prompt."""
        return len(self.tokenizer(self.format(""), add_special_tokens=False)["input_ids"])

    def answer_token_ids(self, words: Sequence[str] = ("Yes", "No")) -> list[int]:
        """First token id of each answer word as the model would write it after the prompt."""
        return [self.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words]

    # -------------------------------------------------------------- layers
    def start(self, texts: Sequence[str], prefix: torch.Tensor | None = None) -> LayerState:
        """Tokenize (left padding) and embed: the state before decoder layer 1.

        prefix: optional ``[B, S, H]`` input embeddings placed before each prompt (collaborative soft
        tokens). Padding then sits between prefix and prompt; it is masked, and positions count real
        tokens only, so each row is computed as if it had no padding.
        """
        if not texts:
            raise ValueError("start() needs at least one prompt")
        batch = self.tokenizer(
            [self.format(t) for t in texts], padding=True, return_tensors="pt", add_special_tokens=False
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


def smollm2_135m(device: str | None = None, **kwargs) -> HFBackbone:
    """SmolLM2-135M-Instruct from the local asset cache (30 layers, hidden 576)."""
    return HFBackbone.from_pretrained(assets.model_dir(assets.SMOLLM2), name="smollm2-135m", device=device, **kwargs)


def hf_model(spec: str, device: str | None = None, **kwargs) -> HFBackbone:
    """Any Llama-style causal LM from a local folder or the local HF cache: ``hf:<path or id>``."""
    return HFBackbone.from_pretrained(spec, name=f"hf:{spec}", device=device, **kwargs)


def smollm2_135m_lora(spec: str, device: str | None = None, **kwargs) -> HFBackbone:
    """SmolLM2-135M with a fine-tuned adapter from ``$MHEE_HOME/adapters/<spec>`` (see mhee_sdk.finetune)."""
    from mhee_sdk.finetune import load_adapter

    return load_adapter(smollm2_135m(device=device, **kwargs), spec)


@hookimpl
def register_backbones(register) -> None:
    register("smollm2-135m", smollm2_135m)
    register("smollm2-135m+lora:", smollm2_135m_lora)
    register("hf:", hf_model)
