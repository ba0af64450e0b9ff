"""A transformers decoder-only causal LM run one decoder layer at a time (any family ``DecoderStack`` runs).

The loop is the model's own ``forward`` unrolled through the family's own pieces
(``mhee_sdk.backbones.families.DecoderStack``): embed, rotary tables and masks per layer kind, then one
decoder layer per ``step``. Prompts are left padded, so every row's last real token sits in the last
column; positions count real tokens only, so a row's result does not depend on its batch's padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mhee_sdk import assets
from mhee_sdk.adapters import Adapter, load_adapter
from mhee_sdk.backbones.families import DecoderStack
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import LayerState

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("int8",)
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device; None or ``auto`` means CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is unknown; use auto, cpu, cuda or cuda:N") from err


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux); empty elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The precision ``auto`` picks on `device`, and why.

    bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AMX-BF16 or
    AVX512-BF16: bench/layers.py measures it), float32 elsewhere (on a CPU without those units bf16 is
    emulated and slower than float32).
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes bfloat16 natively"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no bfloat16"
    if device.type == "cpu":
        native = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
        if native:
            return torch.bfloat16, f"the CPU has {', '.join(native)}"
        return torch.float32, "the CPU has no AMX-BF16 / AVX512-BF16, so bfloat16 would be emulated (slower)"
    return torch.float32, f"float32 is the safe choice on {device.type}"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from its name (float32, bfloat16, float16); None means float32, ``auto`` see `auto_dtype`."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(device or resolve_device(None))[0]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; choose from: auto, {', '.join(DTYPES)}")


class HFBackbone:
    """Layer-by-layer wrapper around a transformers ``*ForCausalLM``.

    Args:
        model: the causal LM, of a family ``DecoderStack`` can run (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3,
            GPT-NeoX, Granite, Cohere are tested; others are checked against their own forward when loaded).
        tokenizer: its tokenizer; a chat template, when present, wraps each prompt.
        name: registry name, used in fingerprints and reports.
        device: ``auto`` (default): CUDA when available, else CPU.
        dtype: precision of the weights and hidden states: float32 (default), bfloat16, float16, or ``auto``
            (bfloat16 where the hardware computes it natively, see `auto_dtype`).
        fingerprint: identifies the weights (default: a hash of the model config); adapter and precision are added.
        adapter: a fine-tuned adapter (``mhee_sdk.adapters.load_adapter``) applied to the model at construction.
        compile: run each decoder layer through ``torch.compile`` (dynamic shapes; the first batches pay the
            compilation).
        quantize: ``int8``: dynamic int8 quantisation of the linear layers (CPU, float32 activations).
        autocast: keep float32 weights and run the layers under ``torch.autocast`` in bfloat16.
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
        compile: bool = False,
        quantize: str | None = None,
        autocast: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        int8_ok = (quantize in QUANTIZE, self.device.type, self.dtype) == (True, "cpu", torch.float32)
        if quantize is not None and not int8_ok:
            raise ValueError(f"quantize={quantize!r}: only 'int8' on the CPU in float32 is supported")
        if autocast and self.dtype != torch.float32:
            raise ValueError(f"autocast keeps float32 weights and computes in bfloat16: it needs float32, not {dtype}")
        self.adapter = adapter
        if adapter is not None:
            adapter.apply_lora(model)
        model = model.to(device=self.device, dtype=self.dtype).eval()
        if quantize == "int8":
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.stack = DecoderStack(self.model)  # TypeError naming what is missing for a family it cannot run
        if compile:
            self.stack.compile_layers()
        self._autocast = autocast
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        fingerprint = fingerprint or f"{name}:{_config_digest(model)}"
        # what computed the hidden states; plain float32 keeps the fingerprints (and caches) of earlier versions
        for tag, on in ((str(self.dtype).removeprefix("torch."), self.dtype != torch.float32), ("compiled", compile),
                        (str(quantize), quantize is not None), ("autocast-bf16", autocast)):  # fmt: skip
            fingerprint += f":{tag}" if on else ""
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
        weights_digest: str | None = None,
        **options: object,
    ) -> HFBackbone:
        """Load from a local folder or the local HF cache; never downloads (``local_files_only``).

        weights_digest: the verified hash of the weights (assets), which the fingerprint is made from;
        without it, from the model config. options: ``compile``, ``quantize``, ``autocast`` (see the class).
        """
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
        fingerprint = f"{label}:{weights_digest[:16]}" if weights_digest else None
        backbone = cls(
            model, tokenizer, name=label, device=device, dtype=dtype, fingerprint=fingerprint, adapter=adapter,
            **options,
        )  # fmt: skip
        if not backbone.stack.tested:  # a family outside the test suite: compare with its own forward once
            backbone.stack.verify()
        return backbone

    def __repr__(self) -> str:
        return (
            f"HFBackbone({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})"
        )

    # -------------------------------------------------------------- text
    @property
    def plain_prompts(self) -> bool:
        """True without a chat template: prompts then get the tokenizer's special tokens (BOS: Gemma needs it)."""
        return not self.tokenizer.chat_template

    def format(self, text: str, system: str | None = None) -> str:
        """Wrap a prompt in the chat template (if the tokenizer has one), ready for the answer token.

        Without a template the system message goes first, then the prompt, then ``Answer:``.
        """
        if not self.tokenizer.chat_template:
            return (text if system is None else f"{system}\n\n{text}") + "\nAnswer:"
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (the chat template adds `template_tokens` on top)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def template_tokens(self, system: str | None = None) -> int:
        """Tokens the chat template (with this system message) adds around a prompt; without one, BOS counts too."""
        return len(self.tokenizer(self.format("", system), add_special_tokens=self.plain_prompts)["input_ids"])

    def answer_token_ids(self, words: Sequence[str] = ("Yes", "No")) -> list[int]:
        """First token id of each answer word as the model would write it after the prompt.

        After a chat template's assistant turn the word starts the text; after a plain ``Answer:`` it
        follows a space (`` Yes``), unless the tokenizer makes the space a token of its own.
        """
        ids = []
        for word in words:
            first = None
            if self.plain_prompts:
                first = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
                if not self.tokenizer.decode([first]).strip():
                    first = None
            ids.append(first if first is not None else self.tokenizer(word, add_special_tokens=False)["input_ids"][0])
        return ids

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
            [self.format(t, system) for t in texts], padding=True, return_tensors="pt",
            add_special_tokens=self.plain_prompts,
        )  # fmt: skip
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.stack.embed(ids)  # [B, T, H]
        if prefix is not None:
            if prefix.shape[0] != len(texts) or prefix.shape[2] != self.hidden_size:
                raise ValueError(f"prefix must be [{len(texts)}, S, {self.hidden_size}], got {tuple(prefix.shape)}")
            hidden = torch.cat([prefix.to(device=self.device, dtype=hidden.dtype), hidden], dim=1)
            mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=self.device), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: real tokens count 0, 1, 2, ...
        # rotary tables and masks, batch first; without padding the mask is left to the attention's causal path
        return LayerState(hidden=hidden, mask=mask, extras=self.stack.prepare(hidden, mask, positions))

    def step(self, state: LayerState) -> LayerState:
        """Run decoder layer ``state.layers_done + 1`` on every row of the batch."""
        if state.layers_done >= self.num_layers:
            raise ValueError(f"all {self.num_layers} layers already ran")
        if self._autocast:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                hidden = self.stack.layer(state.layers_done, state.hidden, state.extras).float()
        else:
            hidden = self.stack.layer(state.layers_done, state.hidden, state.extras)
        self.rows_evaluated += state.batch_size
        return replace(state, hidden=hidden, layers_done=state.layers_done + 1)

    def pooled(self, state: LayerState) -> torch.Tensor:
        """Hidden state of each row's last real token, ``[B, H]`` (left padding puts it last)."""
        return state.hidden[:, -1, :]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm (what its LM head reads)."""
        return self.stack.final_norm(hidden)

    def lm_head_rows(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Rows of the LM head for the given tokens, ``[len(token_ids), H]`` (a copy)."""
        return self.stack.lm_head.weight[list(token_ids)].detach().clone()

    def final_norm_module(self) -> nn.Module:
        """The final norm module itself (heads copy it)."""
        return self.stack.final_norm_module

    def logit_scaling(self) -> tuple[float, float | None]:
        """``(multiplier, soft cap)`` the family applies to raw LM-head outputs (``(1.0, None)`` for most)."""
        return self.stack.logit_scaling


def _config_digest(model: nn.Module) -> str:
    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _adapter(adapter: str | Adapter | None) -> Adapter | None:
    return load_adapter(adapter) if isinstance(adapter, str) else adapter


def _asset_backbone(name: str, doc: str) -> Callable[..., HFBackbone]:
    """The registry factory of model asset `name` (``mhee_sdk.assets``), loaded from the local cache and
    fingerprinted by its verified weights; `doc` is what ``mhee plugins`` and config errors show."""

    def factory(
        device: str | None = None,
        dtype: str | None = "auto",
        adapter: str | Adapter | None = None,
        compile: bool = False,
        quantize: str | None = None,
        autocast: bool = False,
    ) -> HFBackbone:
        path, digest = assets.verified_model_dir(name)  # changed weights are caught before they are used
        return HFBackbone.from_pretrained(
            path, name=name, device=device, dtype=dtype, adapter=_adapter(adapter), weights_digest=digest,
            compile=compile, quantize=quantize, autocast=autocast,
        )  # fmt: skip

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = doc
    return factory


smollm2_135m = _asset_backbone(
    assets.SMOLLM2,
    "SmolLM2-135M-Instruct from the local asset cache (30 layers, hidden 576); `adapter`: a saved adapter's name.",
)
gemma3_270m = _asset_backbone(
    assets.GEMMA3,
    """Gemma 3 270M, the pretrained base model, from the local asset cache (18 layers, hidden 640).

    Optional asset: ``mhee assets install gemma3-270m``. It has no chat template, so prompts end in ``Answer:``
    after Gemma's ``<bos>``.
    """,
)


def hf_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = "auto",
    adapter: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
    autocast: bool = False,
) -> HFBackbone:
    """A causal LM from a local folder or the local HF cache: ``hf:<path or id>``."""
    return HFBackbone.from_pretrained(
        spec, name=f"hf:{spec}", device=device, dtype=dtype, adapter=_adapter(adapter), compile=compile,
        quantize=quantize, autocast=autocast,
    )  # fmt: skip


def smollm2_135m_lora(spec: str, device: str | None = None, dtype: str | None = "auto") -> HFBackbone:
    """SmolLM2-135M with the fine-tuned adapter ``$MHEE_HOME/adapters/<spec>`` (made by ``mhee finetune``)."""
    return smollm2_135m(device=device, dtype=dtype, adapter=spec)


@hookimpl
def register_backbones(register) -> None:
    register("smollm2-135m", smollm2_135m)
    register("gemma3-270m", gemma3_270m)
    register("smollm2-135m+lora:", smollm2_135m_lora)
    register("hf:", hf_model)
