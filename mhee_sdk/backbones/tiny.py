"""A tiny randomly initialised Llama with a byte-level tokenizer: the real code path, in milliseconds.

It needs no assets, so tests and CI tutorials run anywhere. Its predictions mean nothing.
"""

from __future__ import annotations

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


def tiny_backbone(
    num_layers: int = 6,
    hidden_size: int = 64,
    seed: int = 0,
    device: str | None = "cpu",
    attn_implementation: str = "sdpa",
    dtype: str | None = None,
    adapter: str | Adapter | None = None,
) -> HFBackbone:
    """A random Llama (`num_layers` x `hidden_size`, fixed `seed`) for tests and CI; `adapter`: a saved adapter."""
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
    )


@hookimpl
def register_backbones(register) -> None:
    register("tiny", tiny_backbone)
