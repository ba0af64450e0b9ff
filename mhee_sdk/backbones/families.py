"""Any transformers decoder-only causal LM, run one decoder layer at a time through the family's own pieces.

A family's ``*Model.forward`` embeds, builds one attention mask per attention kind with
``transformers.masking_utils`` (full causal, sliding window), one rotary table per rotary kind (Gemma 3
has a local and a global one), calls ``layer(hidden, attention_mask=..., position_embeddings=...)``
for each decoder layer, then the final norm and the LM head. `DecoderStack` makes the same calls,
split so the engine can stop between layers and drop rows: everything per row that the layers read
is in the dict `prepare` returns, batch first, so compaction is one index.

Prompts are left-padded and positions count real tokens only, so a row's result does not depend on
its batch's padding. What differs per family is read from the model and its config (layer types,
sliding window, rotary kinds, attention implementation, embedding scaling inside the embedding
module, attention soft-capping inside the attention). The few things a family does in its forward
outside any module or unambiguous config flag are listed in `_EMBED_MULTIPLIER` and `_LOGIT_SCALE`;
a family not in `TESTED_FAMILIES` may do more, which `verify` finds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

# model_type of every family tests/test_families.py checks against the model's own forward
TESTED_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "granite", "cohere"}
)
ATTENTION_KINDS = ("full_attention", "sliding_attention")
# flash attention takes a [B, T] mask and flex a BlockMask that cannot be indexed by row
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")

# Done in the family's forward, not in a module, under a config name that means different things
# in different families (hyperclovax multiplies by `logits_scaling`, granite divides): keyed by model_type.
_EMBED_MULTIPLIER: dict[str, Callable[[object], float]] = {
    "granite": lambda config: config.embedding_multiplier,
}
_LOGIT_SCALE: dict[str, Callable[[object], float]] = {
    "granite": lambda config: 1.0 / config.logits_scaling,
    "cohere": lambda config: config.logit_scale,
}
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "norm_f")


class DecoderStack:
    """The decoder of a transformers causal LM, runnable one layer at a time through the family's own helpers.

    The caller owns train/eval mode, device and dtype of `model` (this class never changes them). Adapters
    injected into the layers, the embeddings or the LM head after construction are used.
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers import PreTrainedModel

        name = type(model).__name__
        if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
            raise TypeError(f"{name} is not a transformers *ForCausalLM (a PreTrainedModel with an LM head)")
        if getattr(model.config, "is_encoder_decoder", False):
            raise TypeError(f"{name} is an encoder-decoder model; DecoderStack runs decoder-only causal LMs")
        decoder = model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise TypeError(f"{name} has no decoder layers ({type(decoder).__name__}.layers, an nn.ModuleList)")
        config = decoder.config
        if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
            raise TypeError(f"{name} is configured for bidirectional attention (an embedding model), not a causal LM")
        rotary = getattr(decoder, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            raise TypeError(
                f"{name} has no rotary position embedding ({type(decoder).__name__}.rotary_emb); "
                "families with absolute or ALiBi positions are not supported"
            )
        norm = next(
            (getattr(decoder, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None
        )
        if norm is None:
            raise TypeError(f"{name} has no final norm ({type(decoder).__name__}.{' / .'.join(_FINAL_NORM_NAMES)})")
        _check_layer_signature(name, layers[0])
        implementation = config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise TypeError(
                f"{name} uses attn_implementation={implementation!r}; load it with one of: "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        num_layers = int(config.num_hidden_layers)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            # Mistral, Phi3 and others without layer_types: every layer slides when a window is set
            kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
            layer_types = [kind] * num_layers
        unknown = sorted(set(layer_types[:num_layers]) - set(ATTENTION_KINDS))
        if unknown:
            raise TypeError(f"{name} has layers of type {', '.join(unknown)}; supported: {', '.join(ATTENTION_KINDS)}")

        self.model = model
        self.config = config
        self.model_type = str(config.model_type)
        self.num_layers = num_layers
        self.hidden_size = int(config.hidden_size)
        self.layer_types: tuple[str, ...] = tuple(layer_types[:num_layers])
        self._layers = layers
        self._rotary = rotary
        self._norm = norm
        # Gemma 3 (and others) keep one rotary table per layer type: forward(x, position_ids, layer_type)
        self._rotary_per_kind = "layer_type" in inspect.signature(rotary.forward).parameters
        self._embed_multiplier = (
            _EMBED_MULTIPLIER[self.model_type](config) if self.model_type in _EMBED_MULTIPLIER else None
        )
        self._logit_scale = _LOGIT_SCALE[self.model_type](config) if self.model_type in _LOGIT_SCALE else None
        self._softcap = getattr(config, "final_logit_softcapping", None)

    def compile_layers(self) -> None:
        """Run each decoder layer through ``torch.compile`` from now on (dynamic shapes: batches shrink)."""
        self._layers = nn.ModuleList(torch.compile(layer, dynamic=True) for layer in self._layers)

    @property
    def tested(self) -> bool:
        """True for the families the test suite checks against the model's own forward."""
        return self.model_type in TESTED_FAMILIES

    # ------------------------------------------------------------------ the layer loop's pieces
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids to ``[B, T, H]``, scaled as the family does (Gemma's sqrt(H) is in its module)."""
        # looked up per call: an adapter injected later (LoRA) may have replaced the module
        hidden = self.model.get_input_embeddings()(input_ids)
        if self._embed_multiplier is not None:
            hidden = hidden * self._embed_multiplier
        return hidden

    def prepare(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-row tensor the layers read, batch first: positions, rotary tables, 4-D masks.

        mask: ``[B, T]``, 1 = real token (left padding; padding between a prefix and the prompt works too).
        positions: ``[B, T]``, real tokens count 0, 1, 2, ... (``(mask.cumsum(-1) - 1).clamp(min=0)``).
        A mask the attention can build itself (SDPA's causal path, no padding) is left out.
        """
        extras = {"positions": positions}
        for kind in sorted(set(self.layer_types)) if self._rotary_per_kind else [None]:
            table = self._rotary(hidden, positions, kind) if kind else self._rotary(hidden, positions)
            if not (isinstance(table, tuple) and len(table) == 2):
                raise TypeError(f"{type(self._rotary).__name__} does not return a (cos, sin) pair")
            extras[_key("cos", kind)], extras[_key("sin", kind)] = table
        for kind in sorted(set(self.layer_types)):
            attention = self._attention_mask(kind, hidden, mask, positions)
            if attention is not None:
                extras[_key("mask", kind)] = attention
        return extras

    def layer(self, index: int, hidden: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder layer `index` (0-based) on ``[B, T, H]``, with what `prepare` made (rows possibly selected since)."""
        kind = self.layer_types[index]
        rotary = kind if self._rotary_per_kind else None
        out = self._layers[index](
            hidden,
            attention_mask=extras.get(_key("mask", kind)),
            position_embeddings=(extras[_key("cos", rotary)], extras[_key("sin", rotary)]),
            position_ids=extras["positions"],
        )
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm (what the LM head reads)."""
        return self._norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and the family's logit scaling / soft-capping, on ``[..., H]``."""
        return self.scale_logits(self.lm_head(self._norm(hidden)))

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's scaling and soft-capping of raw LM-head outputs (Granite, Cohere, Gemma 2/3); else as is.

        For heads that compute a few LM-head rows themselves (the verbalizer) and must match `logits`.
        """
        if self._logit_scale is not None:
            logits = logits * self._logit_scale
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @property
    def logit_scaling(self) -> tuple[float, float | None]:
        """``(multiplier, soft cap)`` that `scale_logits` applies: the family's, else ``(1.0, None)``."""
        return (1.0 if self._logit_scale is None else float(self._logit_scale), self._softcap)

    @property
    def final_norm_module(self) -> nn.Module:
        """The final norm module itself (exit heads copy it)."""
        return self._norm

    @property
    def lm_head(self) -> nn.Module:
        """The LM head (output embedding) module."""
        return self.model.get_output_embeddings()

    # ------------------------------------------------------------------ self-check
    @torch.no_grad()
    def verify(self, lengths: Sequence[int] = (5, 11), tolerance: float | None = None) -> None:
        """Check that two short random prompts, run as one left-padded batch through these pieces, give what the
        model's own forward gives on each prompt alone; TypeError naming the first layer that differs.

        For families outside TESTED_FAMILIES, whose forward may do something this class does not know about.
        tolerance: relative error allowed (default 1e-4 in float32, 3e-2 in 16-bit types).
        """
        device = self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        tolerance = tolerance or (1e-4 if dtype == torch.float32 else 3e-2)
        generator = torch.Generator().manual_seed(0)
        vocab = min(int(self.config.vocab_size), 1000)
        prompts = [torch.randint(1, vocab, (n,), generator=generator).to(device) for n in lengths]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
        hidden = self.embed(ids)
        extras = self.prepare(hidden, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        states = [hidden]
        for index in range(self.num_layers):
            states.append(self.layer(index, states[-1], extras))
        for row, prompt in enumerate(prompts):
            own = self.model(input_ids=prompt[None], output_hidden_states=True)
            real = slice(width - len(prompt), width)
            for index, reference in enumerate(own.hidden_states[: self.num_layers + 1]):
                # transformers reports the last layer's output after the final norm
                mine = self.final_norm(states[index]) if index == self.num_layers else states[index]
                if _relative_error(mine[row, real], reference[0]) > tolerance:
                    where = "the embedding output" if index == 0 else f"the output of decoder layer {index}"
                    raise TypeError(
                        f"{type(self.model).__name__} ({self.model_type}): {where} differs from the model's own "
                        "forward; its forward does something DecoderStack does not (see mhee_sdk/backbones/families.py)"
                    )
            if _relative_error(self.logits(states[-1][row, -1]), own.logits[0, -1]) > tolerance:
                raise TypeError(
                    f"{type(self.model).__name__} ({self.model_type}): final logits differ from the model's own "
                    "forward (an unknown logit scaling?)"
                )

    # ------------------------------------------------------------------ masks
    def _attention_mask(
        self, kind: str, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """The family's mask for one attention kind, ``[B, 1, T, T]`` (bool for SDPA, additive for eager), or None."""
        from transformers import masking_utils as masks

        sliding = kind == "sliding_attention"
        if bool((mask[:, 1:] >= mask[:, :-1]).all()):
            # Padding on the left only (or none): the family's own helper. No position_ids: ours restart at 0
            # after the padding, which it would read as packed sequences; it counts columns instead, the same
            # distances here. It returns None where SDPA's is_causal path is exact (no padding, no window to apply).
            build = masks.create_sliding_window_causal_mask if sliding else masks.create_causal_mask
            attention = build(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
            if attention is None:
                return None
        else:
            # Padding between a prefix and the prompt: columns no longer measure distance, so apply the family's
            # mask function (as its helper would) to real-token positions, through the same mask interface.
            function = (
                masks.sliding_window_causal_mask_function(self.config.sliding_window)
                if sliding
                else masks.causal_mask_function
            )
            attention = masks.ALL_MASK_ATTENTION_FUNCTIONS[self.config._attn_implementation](
                batch_size=hidden.shape[0],
                q_length=hidden.shape[1],
                kv_length=hidden.shape[1],
                mask_function=masks.remap_positions_for_packed_sequence(function, positions),
                attention_mask=mask.bool(),
                allow_is_causal_skip=False,
                dtype=hidden.dtype,
                device=hidden.device,
            )
        # A padding query has no real key to see; some kernels then return NaN, which would reach real tokens
        # through the next layer's values (0 * NaN). Let it see itself: real rows already do.
        diagonal = torch.eye(attention.shape[-1], dtype=torch.bool, device=attention.device)
        if attention.dtype == torch.bool:
            return attention | diagonal
        return attention.masked_fill(diagonal, 0.0)


def _key(what: str, kind: str | None) -> str:
    """Name of an extras entry: ``cos`` / ``sin`` for a single rotary table, ``mask:sliding_attention`` ..."""
    return what if kind is None else f"{what}:{kind}"


_LAYER_ARGUMENTS = ("attention_mask", "position_embeddings", "position_ids")


def _check_layer_signature(name: str, layer: nn.Module) -> None:
    """The layer takes what `DecoderStack.layer` passes, and needs nothing else."""
    parameters = inspect.signature(layer.forward).parameters
    missing = [p for p in _LAYER_ARGUMENTS[:2] if p not in parameters]
    required = [
        p.name
        for p in list(parameters.values())[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in _LAYER_ARGUMENTS
    ]
    if missing or required:
        problem = f"takes no {', '.join(missing)}" if missing else f"needs {', '.join(required)}"
        raise TypeError(
            f"{name}'s decoder layer {type(layer).__name__} {problem}; DecoderStack calls "
            "layer(hidden, attention_mask=..., position_embeddings=(cos, sin), position_ids=...)"
        )


def _relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((mine.float() - reference).norm() / reference.norm().clamp(min=1e-6))
