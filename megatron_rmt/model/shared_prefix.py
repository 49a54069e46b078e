"""Shared-prefix RL groups: one row holds a prompt once and then its G responses.

Each response attends causally to the prompt and to its own earlier tokens only, and its RoPE
positions continue from the prompt's end, so every response token sees exactly what it sees in
its own `prompt + response` row: the same log-probs for a fraction of the tokens.

How it reaches Megatron's GPTModel:
- The mask travels as GPTModel.forward's `attention_mask` (`[b, 1, s, s]` bool, True = masked,
  Megatron's convention), built on the device from per-token segment ids (`block_mask`).
- The core attention given through the layer spec must honour a mask while its spec says
  `causal`: with a mask it switches to Megatron's `arbitrary` mask type for that call, without
  one it is the stock module unchanged (the NTP pass and evaluation pass no mask). On CPU the
  stock local DotProductAttention already applies a given mask, but on GPU its fused causal
  softmax kernel ignores the mask; TE's attention likewise follows the mask type, not the mask.
- GPTModel computes RoPE for positions 0..s-1 whatever `position_ids` says; `rope_at` replaces
  that table, for one call, by the one of the given positions (every pipeline stage applies RoPE,
  so every stage needs it).
"""

from contextlib import contextmanager

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import unwrap_model

PROMPT = 0  # segment id of the shared prompt; response k has k + 1, padding -1


def block_mask(segments: torch.Tensor) -> torch.Tensor:  # [b, s] -> [b, 1, s, s] bool
    """True where query i may NOT attend key j: allowed are j <= i with j in the prompt or in
    i's own segment (padding attends to itself and the prompt, and is never attended to)."""
    s = segments.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()  # [s, s]
    same = segments.unsqueeze(-1) == segments.unsqueeze(-2)  # [b, s, s]
    prompt = (segments == PROMPT).unsqueeze(-2)  # [b, 1, s]
    return ~(causal & (same | prompt)).unsqueeze(1)


class MaskedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, applying an explicit mask whenever one is given."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        if attention_mask is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, **kwargs)
        softmax = self.scale_mask_softmax
        spec_type, softmax.attn_mask_type = softmax.attn_mask_type, AttnMaskType.arbitrary
        try:
            return super().forward(
                query, key, value, attention_mask, AttnMaskType.arbitrary, **kwargs
            )
        finally:
            softmax.attn_mask_type = spec_type


def _te_masked_attention():
    """Transformer Engine's core attention, told `arbitrary` whenever a mask is given (TE then
    picks a backend that supports it). Imported only where TE is."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEMaskedDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            if attention_mask is not None:
                attn_mask_type = AttnMaskType.arbitrary
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, *args, **kwargs
            )

    return TEMaskedDotProductAttention


def with_masked_attention(spec: ModuleSpec, transformer_engine: bool) -> ModuleSpec:
    """The layer spec with its core attention replaced by the mask-honouring subclass."""
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = (
        _te_masked_attention() if transformer_engine else MaskedDotProductAttention
    )
    return spec


@contextmanager
def rope_at(model: torch.nn.Module, position_ids: torch.Tensor):  # position_ids [1, s]
    """Within the block, `model`'s RoPE table is that of `position_ids` instead of 0..s-1.
    One position row for the whole microbatch (every row of it shares the layout)."""
    rope = getattr(unwrap_model(model), "rotary_pos_emb", None)
    if rope is None:
        raise ValueError("shared-prefix groups need a RoPE model")
    if position_ids.shape[0] != 1:
        raise ValueError(f"one row of position ids expected, got {tuple(position_ids.shape)}")

    def table(module, args, output):  # output [s, 1, 1, dim] for positions 0..s-1
        positions = position_ids[0].to(module.inv_freq)
        if module.seq_len_interpolation_factor is not None:
            positions = positions * (1 / module.seq_len_interpolation_factor)  # as RoPE does
        freqs = torch.outer(positions, module.inv_freq)  # [s, dim/2]
        if module.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :].to(output.dtype)

    hook = rope.register_forward_hook(table)
    try:
        yield
    finally:
        hook.remove()
