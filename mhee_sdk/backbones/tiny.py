"""Tiny randomly initialised decoders with a byte-level tokenizer: the real code path, in milliseconds.

``tiny`` is a 6-layer Llama; ``tiny:<family>`` the same for any family in :data:`FAMILIES` (Mistral,
Qwen, Gemma 1-3, Phi3, GPT-NeoX ...), built from a config with small sizes and short sliding windows so
every family-specific path runs. They need no assets, so tests and CI tutorials run anywhere. Their
predictions mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mhee_sdk.adapters import Adapter, load_adapter
from mhee_sdk.backbones.hf import HFBackbone
from mhee_sdk.hookspecs import hookimpl


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + pad/eos) built in code, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


# Small sizes; sliding windows shorter than most prompts and scalings/soft-caps large enough to matter.
_GQA = dict(num_key_value_heads=2)

_FAMILY_CONFIGS: dict[str, Callable[..., Any]] = {
    "llama": lambda hf, common, window: hf.LlamaConfig(**common, **_GQA, num_hidden_layers=3),
    "mistral": lambda hf, common, window: hf.MistralConfig(
        **common, **_GQA, num_hidden_layers=3, sliding_window=window
    ),
    "qwen2": lambda hf, common, window: hf.Qwen2Config(**common, **_GQA, num_hidden_layers=3),
    # layer 0 full attention, layers 1-2 sliding
    "qwen2-sliding": lambda hf, common, window: hf.Qwen2Config(
        **common, **_GQA, num_hidden_layers=3, use_sliding_window=True, sliding_window=window, max_window_layers=1
    ),
    "qwen3": lambda hf, common, window: hf.Qwen3Config(**common, **_GQA, num_hidden_layers=3, head_dim=16),
    "gemma": lambda hf, common, window: hf.GemmaConfig(**common, **_GQA, num_hidden_layers=3, head_dim=16),
    "gemma2": lambda hf, common, window: hf.Gemma2Config(
        **common,
        **_GQA,
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0,
    ),
    "gemma3": lambda hf, common, window: hf.Gemma3TextConfig(
        **common,
        **_GQA,
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=2.0,
    ),
    "phi3": lambda hf, common, window: hf.Phi3Config(
        **common, **_GQA, num_hidden_layers=3, sliding_window=window, partial_rotary_factor=0.5
    ),
    # the family of our choice: other module names, LayerNorm with bias, parallel attention + MLP, partial rotary
    "gpt_neox": lambda hf, common, window: hf.GPTNeoXConfig(
        **common, num_hidden_layers=3, rotary_pct=0.25, use_parallel_residual=True
    ),
    "granite": lambda hf, common, window: hf.GraniteConfig(
        **common,
        **_GQA,
        num_hidden_layers=3,
        embedding_multiplier=6.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
    ),
    "cohere": lambda hf, common, window: hf.CohereConfig(
        **common, **_GQA, num_hidden_layers=3, logit_scale=0.25, use_qk_norm=True
    ),
}
FAMILIES = tuple(_FAMILY_CONFIGS)


def family_config(family: str, vocab_size: int, window: int = 6) -> Any:
    """A tiny transformers config of `family` (one of FAMILIES) with `vocab_size` tokens and sliding `window`."""
    import transformers

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"family {family!r} is unknown; choose from: {', '.join(FAMILIES)}")
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _FAMILY_CONFIGS[family](transformers, common, window)


def tiny_family(
    spec: str, seed: int = 0, device: str | None = "cpu", dtype: str | None = None, attn_implementation: str = "sdpa"
) -> HFBackbone:
    """``tiny:<family>``: a random model of that family (3-4 layers, hidden 64) with the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = family_config(spec, vocab_size=len(tokenizer))
    if spec == "gemma2":  # Gemma 2 soft-caps attention logits, which SDPA cannot: transformers refuses it
        attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # seeded; the caller's random stream is untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return HFBackbone(model, tokenizer, name=f"tiny:{spec}", device=device, dtype=dtype,
                      fingerprint=f"tiny:{spec}:seed{seed}")  # fmt: skip


def tiny_backbone(
    num_layers: int = 6,
    hidden_size: int = 64,
    seed: int = 0,
    device: str | None = "cpu",
    attn_implementation: str = "sdpa",
    dtype: str | None = None,
    adapter: str | Adapter | None = None,
    compile: bool = False,
    quantize: str | None = None,
    autocast: bool = False,
) -> HFBackbone:
    """A random Llama (`num_layers` x `hidden_size`, fixed `seed`) for tests and CI; `adapter`: a saved adapter.

    float32 unless `dtype` says otherwise, whatever the hardware: test results do not depend on the machine.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = attn_implementation
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)  # leave the caller's random stream untouched
    return HFBackbone(
        model,
        tokenizer,
        name="tiny",
        device=device,
        dtype=dtype,
        fingerprint=f"tiny:L{num_layers}:H{hidden_size}:seed{seed}",
        adapter=load_adapter(adapter) if isinstance(adapter, str) else adapter,
        compile=compile,
        quantize=quantize,
        autocast=autocast,
    )


@hookimpl
def register_backbones(register) -> None:
    register("tiny", tiny_backbone)
    register("tiny:", tiny_family)
