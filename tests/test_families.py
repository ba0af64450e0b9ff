"""DecoderStack on every supported family: a tiny random model of each, checked against the model's own forward.

Prompts run together as one left-padded batch, layer by layer, as the engine runs them; the reference is
the model's plain forward on each prompt alone (batch 1, no padding). The sliding window (6) is shorter
than most prompts, and the scalings and soft-caps are set large enough that leaving one out shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cache, partial

import pytest
import torch
import transformers as hf

from mhee_sdk.backbones.families import TESTED_FAMILIES, DecoderStack
from mhee_sdk.backbones.tiny import FAMILIES, family_config
from mhee_sdk.interfaces import LayerState

WINDOW = 6
LENGTHS = (13, 4, 21, 9)  # tokens per prompt; the batch is padded to 21
CONFIGS = {family: partial(family_config, family, vocab_size=96, window=WINDOW) for family in FAMILIES}
_COMMON = {k: v for k, v in CONFIGS["llama"]().to_dict().items() if k in (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "initializer_range", "pad_token_id",
    "bos_token_id", "eos_token_id")}  # fmt: skip
_GQA = dict(num_key_value_heads=2)
# Gemma2 declares no SDPA support (SDPA cannot soft-cap attention logits)
CASES = [(family, kind) for family in CONFIGS for kind in ("eager", "sdpa") if (family, kind) != ("gemma2", "sdpa")]
SLIDING = ["mistral", "qwen2-sliding", "gemma2", "gemma3", "phi3"]


@cache
def tiny_model(family: str, attention: str) -> hf.PreTrainedModel:
    torch.manual_seed(0)
    return hf.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attention).eval()


def prompts(lengths: Sequence[int] = LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=generator) for n in lengths]


class Runner:
    """What HFBackbone.start / step do with a DecoderStack: one LayerState, advanced a layer at a time."""

    def __init__(self, stack: DecoderStack) -> None:
        self.stack = stack

    def start(self, token_ids: Sequence[torch.Tensor], prefix: torch.Tensor | None = None) -> LayerState:
        """prefix: ``[B, S, H]`` embeddings placed before each prompt (soft tokens); padding then sits between."""
        width = max(len(ids) for ids in token_ids)
        ids = torch.zeros(len(token_ids), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(token_ids):  # left padding: every row's last real token is in the last column
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
        hidden = self.stack.embed(ids)
        if prefix is not None:
            hidden = torch.cat([prefix.to(hidden.dtype), hidden], dim=1)
            mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count 0, 1, 2, ...
        return LayerState(hidden=hidden, mask=mask, extras=self.stack.prepare(hidden, mask, positions))

    def step(self, state: LayerState) -> LayerState:
        hidden = self.stack.layer(state.layers_done, state.hidden, state.extras)
        return replace(state, hidden=hidden, layers_done=state.layers_done + 1)

    def pooled(self, state: LayerState) -> torch.Tensor:
        return state.hidden[:, -1, :]


def reference(model: hf.PreTrainedModel, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The model's own forward on one prompt alone: hidden states after each layer (last one after the final
    norm, as transformers reports it) and the last token's logits."""
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0, -1]


def assert_layer_matches(stack: DecoderStack, state: LayerState, row: int, expected: torch.Tensor, atol: float):
    """Row `row` of `state` at its real tokens equals the reference after the same layer."""
    mine = state.hidden[row]
    if state.layers_done == stack.num_layers:
        mine = stack.final_norm(mine)
    real = state.mask[row].bool()
    torch.testing.assert_close(
        mine[real], expected, atol=atol, rtol=atol, msg=lambda m: f"layer {state.layers_done}: {m}"
    )


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize(("family", "attention"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_left_padded_batch_equals_each_prompt_alone(family, attention):
    model = tiny_model(family, attention)
    stack, batch = DecoderStack(model), prompts()
    references = [reference(model, ids) for ids in batch]
    runner = Runner(stack)
    with torch.no_grad():
        state = runner.start(batch)
        assert state.batch_size == len(batch) and state.hidden.shape[1] == max(LENGTHS)
        for row, (hidden_states, _) in enumerate(references):  # the embeddings, scaling included
            assert_layer_matches(stack, state, row, hidden_states[0], atol=1e-5)
        for _ in range(stack.num_layers):
            state = runner.step(state)
            for row, (hidden_states, _) in enumerate(references):
                assert_layer_matches(stack, state, row, hidden_states[state.layers_done], atol=1e-5)
        logits = stack.logits(runner.pooled(state))
    for row, (_, last_logits) in enumerate(references):
        torch.testing.assert_close(logits[row], last_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "attention"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_compacted_rows_equal_each_prompt_alone(family, attention):
    model = tiny_model(family, attention)
    stack, batch = DecoderStack(model), prompts(seed=1)
    runner = Runner(stack)
    kept = [2, 0]  # reordered, and the longest prompt stays: the width does not shrink
    with torch.no_grad():
        state = runner.start(batch)
        for _ in range(2):
            state = runner.step(state)
        state = state.select(torch.tensor(kept))
        while state.layers_done < stack.num_layers:
            state = runner.step(state)
        logits = stack.logits(runner.pooled(state))
    for row, prompt in enumerate(kept):
        hidden_states, last_logits = reference(model, batch[prompt])
        assert_layer_matches(stack, state, row, hidden_states[-1], atol=1e-5)
        torch.testing.assert_close(logits[row], last_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gemma3", "qwen2-sliding"])
def test_unpadded_batch_leaves_out_only_the_masks_attention_builds_itself(family, attention):
    model = tiny_model(family, attention)
    stack, runner = DecoderStack(model), Runner(DecoderStack(model))
    long = prompts((WINDOW + 5, WINDOW + 5))
    cases = {"short": prompts((WINDOW - 1, WINDOW - 1)), "long": long}
    with torch.no_grad():
        masks = {name: sorted(k for k in runner.start(p).extras if k.startswith("mask")) for name, p in cases.items()}
        state = runner.start(long)
        for _ in range(stack.num_layers):
            state = runner.step(state)
        logits = stack.logits(runner.pooled(state))
    if attention == "eager":  # eager attention reads the mask whatever the batch
        assert masks["short"] == masks["long"] == ["mask:full_attention", "mask:sliding_attention"]
    else:  # SDPA is causal by itself; a window only matters once the prompt is longer than it
        assert masks == {"short": [], "long": ["mask:sliding_attention"]}
    for row, ids in enumerate(long):
        torch.testing.assert_close(logits[row], reference(model, ids)[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "attention"), [("gemma3", "eager"), ("gemma3", "sdpa"), ("mistral", "sdpa")])
def test_padding_between_a_prefix_and_the_prompt_changes_nothing(family, attention):
    """Soft-token prefixes put the padding mid-row: the window must count real tokens, not columns."""
    model = tiny_model(family, attention)
    stack, batch = DecoderStack(model), prompts((4, 17))
    prefix = torch.randn(len(batch), 3, stack.hidden_size, generator=torch.Generator().manual_seed(2))
    runner = Runner(stack)
    with torch.no_grad():
        state = runner.start(batch, prefix=prefix)
        for _ in range(stack.num_layers):
            state = runner.step(state)
        logits = stack.logits(runner.pooled(state))
        for row, ids in enumerate(batch):
            alone = model(inputs_embeds=torch.cat([prefix[row], stack.embed(ids)])[None], output_hidden_states=True)
            assert_layer_matches(stack, state, row, alone.hidden_states[-1][0], atol=1e-5)
            torch.testing.assert_close(logits[row], alone.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_adapters_injected_after_construction_are_used():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(CONFIGS["qwen3"]()).eval()
    stack = DecoderStack(model)  # built first, as a backbone is before fine-tuning adds LoRA
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]), model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op; make it change the output
                parameter.normal_(std=0.5)
    stack.verify()


# ---------------------------------------------------------------------------------------------- the checks bite
@pytest.mark.parametrize("family", SLIDING)
def test_the_window_matters_in_these_tests(family):
    """Full causal attention in place of the sliding window gives a visibly different answer."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_model(family, "eager")
    stack, batch = DecoderStack(model), prompts()
    runner = Runner(stack)
    with torch.no_grad():
        state = runner.start(batch)
        full = create_causal_mask(
            config=stack.config, inputs_embeds=state.hidden, attention_mask=state.mask, cache=None
        )
        state = replace(state, extras={**state.extras, "mask:sliding_attention": full})
        for _ in range(stack.num_layers):
            state = runner.step(state)
        logits = stack.logits(runner.pooled(state))
    assert (logits[2] - reference(model, batch[2])[1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "granite", "cohere"])
def test_the_final_logit_scaling_matters_and_scale_logits_applies_it(family):
    model = tiny_model(family, "eager")
    stack, (ids,) = DecoderStack(model), prompts((9,))
    hidden_states, last_logits = reference(model, ids)
    with torch.no_grad():
        raw = stack.lm_head(hidden_states[-1][-1])  # last layer, already normed; no scaling, no soft-cap
        scaled = stack.scale_logits(raw)
    assert (raw - last_logits).abs().max() > 1e-2
    torch.testing.assert_close(scaled, last_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt_neox"])
def test_16_bit_runs_and_stays_close_to_float32(family, dtype):
    model = tiny_model(family, "eager" if family == "gemma2" else "sdpa")
    low = hf.AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
    low.load_state_dict(model.state_dict())
    stack, batch = DecoderStack(low), prompts()
    runner = Runner(stack)
    with torch.no_grad():
        state = runner.start(batch)
        for _ in range(stack.num_layers):
            state = runner.step(state)
        assert state.hidden.dtype == dtype and torch.isfinite(state.hidden).all()
        logits = stack.logits(runner.pooled(state))
        final = stack.final_norm(runner.pooled(state)).float()
    for row, ids in enumerate(batch):
        hidden_states, last_logits = reference(model, ids)
        # measured on all families here: relative error <= 0.020 in bf16, <= 0.0026 in fp16
        tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
        assert _relative(final[row], hidden_states[-1][-1]) < tolerance
        assert _relative(logits[row].float(), last_logits) < tolerance


def _relative(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((mine - reference).norm() / reference.norm())


# ---------------------------------------------------------------------------------------------- what it refuses
def test_tested_families_are_the_ones_tested_here():
    assert {tiny_model(f, "eager").config.model_type for f in CONFIGS} == TESTED_FAMILIES


def test_encoder_decoder_is_refused():
    t5 = hf.T5ForConditionalGeneration(
        hf.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        DecoderStack(t5)


def test_families_without_layers_or_rotary_are_refused():
    gpt2 = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="GPT2LMHeadModel has no decoder layers"):
        DecoderStack(gpt2)
    opt = hf.OPTForCausalLM(
        hf.OPTConfig(
            vocab_size=32,
            hidden_size=16,
            word_embed_proj_dim=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(TypeError, match="OPTForCausalLM has no rotary position embedding"):
        DecoderStack(opt)


def test_objects_that_are_not_causal_lms_are_refused():
    with pytest.raises(TypeError, match="Linear is not a transformers \\*ForCausalLM"):
        DecoderStack(torch.nn.Linear(2, 2))
    encoder = hf.AutoModel.from_config(CONFIGS["llama"]())  # the bare decoder, no LM head
    with pytest.raises(TypeError, match="LlamaModel is not a transformers \\*ForCausalLM"):
        DecoderStack(encoder)


def test_bidirectional_gemma3_is_refused():
    config = CONFIGS["gemma3"]()
    config.use_bidirectional_attention = True
    with pytest.raises(TypeError, match="bidirectional attention"):
        DecoderStack(hf.Gemma3ForCausalLM(config))


def test_unsupported_attention_implementation_is_named():
    model = hf.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="flex_attention")
    with pytest.raises(TypeError, match="attn_implementation='flex_attention'; load it with one of: eager, sdpa"):
        DecoderStack(model)


def test_layers_of_an_unknown_kind_are_named():
    config = hf.Qwen3NextConfig(
        **_COMMON, **_GQA, num_hidden_layers=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    )  # fmt: skip
    with pytest.raises(TypeError, match="has layers of type linear_attention; supported: full_attention, sliding"):
        DecoderStack(hf.Qwen3NextForCausalLM(config))


# ---------------------------------------------------------------------------------------------- verify
def test_verify_passes_on_a_tested_family_and_catches_an_untested_familys_scaling():
    stack = DecoderStack(tiny_model("granite", "sdpa"))
    assert stack.tested
    stack.verify()
    # AFMoE runs through DecoderStack, but with muP its forward multiplies the embeddings by sqrt(H)
    config = hf.AfmoeConfig(**_COMMON, **_GQA, num_hidden_layers=2, head_dim=16, mup_enabled=True)
    torch.manual_seed(0)
    stack = DecoderStack(hf.AutoModelForCausalLM.from_config(config).eval())
    assert not stack.tested
    with pytest.raises(TypeError, match=r"AfmoeForCausalLM \(afmoe\): the embedding output differs"):
        stack.verify()
