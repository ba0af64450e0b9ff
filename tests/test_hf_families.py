"""The hf backbone on every supported family: a tiny random model of each, through the backbone contract.

`tests/test_families.py` checks DecoderStack against each model's own forward; here the same families
run as backbones (``tiny:<family>``, and ``hf:<folder>`` after saving one to disk) through
``check_backbone`` (padding, compaction, determinism) and against the model's own logits.
"""

from __future__ import annotations

import pytest
import torch

from mhee_sdk.backbones.tiny import FAMILIES
from mhee_sdk.registry import Registry
from mhee_sdk.testing import check_backbone

TEXTS = ["User: 24-year-old technician.\nCandidate: a comedy.", "short", "A somewhat longer prompt " * 3, "x y"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(load_entry_points=False)


def own_logits(backbone, text: str) -> torch.Tensor:
    """The model's plain forward on one prompt alone: the last token's logits."""
    ids = backbone.tokenizer(backbone.format(text), return_tensors="pt", add_special_tokens=backbone.plain_prompts)
    with torch.no_grad():
        return backbone.model(input_ids=ids["input_ids"]).logits[0, -1]


def layer_by_layer_logits(backbone, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        state = backbone.start(texts)
        for _ in range(backbone.num_layers):
            state = backbone.step(state)
        return backbone.stack.logits(backbone.pooled(state))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_as_a_backbone(registry, family):
    backbone = registry.create("backbone", f"tiny:{family}")
    check_backbone(backbone, TEXTS, atol=1e-5)
    batched = layer_by_layer_logits(backbone, TEXTS)
    for row, text in enumerate(TEXTS):
        torch.testing.assert_close(batched[row], own_logits(backbone, text), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_loads_any_family_from_a_local_folder(registry, family, tmp_path):
    built = registry.create("backbone", f"tiny:{family}")
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    loaded = registry.create("backbone", f"hf:{tmp_path}")
    assert (loaded.num_layers, loaded.hidden_size, loaded.name) == (built.num_layers, 64, f"hf:{tmp_path}")
    torch.testing.assert_close(layer_by_layer_logits(loaded, TEXTS), layer_by_layer_logits(built, TEXTS))


def test_a_family_it_cannot_run_is_named(registry, tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=True))  # fmt: skip
    model.save_pretrained(tmp_path)
    registry.create("backbone", "tiny").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"BertLMHeadModel .*(no decoder layers|no rotary|not a transformers)"):
        registry.create("backbone", f"hf:{tmp_path}")


def test_bfloat16_stays_close_to_float32(registry):
    full = registry.create("backbone", "tiny:gemma3")
    half = registry.create("backbone", "tiny:gemma3", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fingerprint != full.fingerprint  # caches must not mix
    with torch.inference_mode():
        a, b = full.start(TEXTS), half.start(TEXTS)
        for _ in range(full.num_layers):
            a, b = full.step(a), half.step(b)
    cosine = torch.nn.functional.cosine_similarity(full.pooled(a), half.pooled(b).float(), dim=-1)
    assert cosine.min() > 0.99
