from __future__ import annotations

import pytest
import torch

TEXTS = [
    "User: 24-year-old male technician.\nCandidate: Toy Story (1995; Animation)\nAnswer Yes or No.",
    "short",
    "User: 53-year-old female other.\nThe user's earlier ratings (1-5):\n- Heat (1995; Action): 4\nCandidate: X",
]


def full_depth_matches_model(backbone, texts, atol):
    state = backbone.start(texts)
    for _ in range(backbone.num_layers):
        state = backbone.step(state)
    assert state.layers_done == backbone.num_layers
    mine = backbone.final_norm(state.hidden)
    batch = backbone.tokenizer(  # as the backbone tokenizes: special tokens (BOS) only without a chat template
        [backbone.format(t) for t in texts],
        padding=True,
        return_tensors="pt",
        add_special_tokens=backbone.plain_prompts,
    )
    with torch.no_grad():
        reference = backbone.model.model(
            input_ids=batch["input_ids"].to(backbone.device),
            attention_mask=batch["attention_mask"].to(backbone.device),
            position_ids=state.extras["positions"],
        ).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(mine[real], reference[real], atol=atol, rtol=0)
    # and a single unpadded prompt through the model's plain forward (its own positions)
    alone = backbone.start(texts[:1])
    for _ in range(backbone.num_layers):
        alone = backbone.step(alone)
    ids = backbone.tokenizer(backbone.format(texts[0]), return_tensors="pt", add_special_tokens=backbone.plain_prompts)
    ids = ids["input_ids"]
    with torch.no_grad():
        plain = backbone.model.model(input_ids=ids.to(backbone.device)).last_hidden_state
    assert torch.allclose(backbone.final_norm(alone.hidden)[0], plain[0], atol=atol, rtol=0)


def test_layer_by_layer_equals_model_forward_tiny(tiny):
    with torch.inference_mode():
        full_depth_matches_model(tiny, TEXTS, atol=1e-4)


def test_padding_does_not_change_a_row(tiny):
    with torch.inference_mode():
        batch = tiny.start(TEXTS)
        alone = tiny.start(TEXTS[1:2])
        for _ in range(tiny.num_layers):
            batch, alone = tiny.step(batch), tiny.step(alone)
        assert torch.allclose(tiny.pooled(batch)[1], tiny.pooled(alone)[0], atol=1e-5)


def test_select_keeps_rows_and_their_positions(tiny):
    with torch.inference_mode():
        state = tiny.start(TEXTS)
        for _ in range(2):
            state = tiny.step(state)
        kept = state.select(torch.tensor([2, 0]))
        reference = tiny.start([TEXTS[2], TEXTS[0]])
        for _ in range(2):
            reference = tiny.step(reference)
        for _ in range(tiny.num_layers - 2):
            kept, reference = tiny.step(kept), tiny.step(reference)
        # the kept batch still carries the original (longer) padding: compare the last real token
        assert torch.allclose(tiny.pooled(kept), tiny.pooled(reference), atol=1e-5)


def test_step_past_the_last_layer_and_empty_batch_are_errors(tiny):
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny.start([])
    state = tiny.start(["x"])
    with torch.inference_mode():
        for _ in range(tiny.num_layers):
            state = tiny.step(state)
        with pytest.raises(ValueError, match="all 6 layers already ran"):
            tiny.step(state)


def test_hf_family_refuses_to_download():
    from mhee_sdk.registry import Registry

    with pytest.raises(FileNotFoundError, match="never downloads"):
        Registry(load_entry_points=False).create("backbone", "hf:not-a-user/not-a-model-xyz")


@pytest.mark.slow
def test_layer_by_layer_equals_model_forward_smollm2():
    from mhee_sdk.registry import create

    backbone = create("backbone", "smollm2-135m", device="cpu")
    assert (backbone.num_layers, backbone.hidden_size) == (30, 576)
    with torch.inference_mode():
        full_depth_matches_model(backbone, TEXTS, atol=1e-4)


GEMMA_PROMPTS = [
    "User: 24-year-old male technician.\nCandidate: Toy Story (1995; Animation, Children's, Comedy)\n"
    "Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No.",
    "User: 53-year-old female other.\nThe user's earlier ratings (1-5):\n- Heat (1995; Action, Crime, Thriller): 4\n"
    "- Fargo (1996; Crime, Drama, Thriller): 5\nCandidate: Scream (1996; Horror, Thriller)\nAnswer Yes or No.",
    "short",
    "Candidate: Star Wars (1977; Action, Adventure, Romance, Sci-Fi, War)",
]


@pytest.mark.slow
def test_gemma3_270m_layer_by_layer_equals_its_own_forward():
    from mhee_sdk import assets
    from mhee_sdk.registry import create
    from mhee_sdk.testing import check_backbone

    if not (assets.home() / assets.ASSETS[assets.GEMMA3].model_folder / ".complete.json").is_file():
        pytest.skip("gemma3-270m is an optional asset and is not installed (`mhee assets install gemma3-270m`)")
    backbone = create("backbone", "gemma3-270m", device="cpu", dtype="float32")
    assert (backbone.num_layers, backbone.hidden_size) == (18, 640)
    tokenizer = backbone.tokenizer
    assert backbone.plain_prompts  # the base model has no chat template: "...\nAnswer:" after <bos>
    assert [tokenizer.decode([i]) for i in backbone.answer_token_ids()] == [" Yes", " No"]
    # Gemma's hidden states are large (scaled embeddings, growing residuals): a fixed 1e-4 is below fp32 rounding
    scale = 1e-3 * float(backbone.start(GEMMA_PROMPTS[:1]).hidden.abs().max())  # tolerance scaled to the embeddings
    check_backbone(backbone, GEMMA_PROMPTS, atol=max(1e-4, scale))
    with torch.inference_mode():
        full_depth_matches_model(backbone, GEMMA_PROMPTS, atol=max(1e-4, scale))
        state = backbone.start(GEMMA_PROMPTS)
        assert (state.hidden.shape[1] - state.mask.sum(1) == 0).any()  # the longest prompt is not padded
        for _ in range(backbone.num_layers):
            state = backbone.step(state)
        mine = backbone.stack.logits(backbone.pooled(state))  # [B, vocab]: what the model would say next
        for row, text in enumerate(GEMMA_PROMPTS):
            ids = tokenizer(backbone.format(text), return_tensors="pt")["input_ids"]
            assert ids[0, 0] == tokenizer.bos_token_id
            own = backbone.model(input_ids=ids).logits[0, -1]  # the model's own forward, the prompt alone
            assert (mine[row] - own).abs().max() <= 1e-5 * own.abs().max() + 1e-4
            assert mine[row].argmax() == own.argmax()
