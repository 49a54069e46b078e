"""GPTModel's logits as a `[b, s, v/tp]` view of the output layer's own `[s, b, v/tp]` tensor.

Called without labels, GPTModel returns `logits.transpose(0, 1).contiguous()`: a full copy of
the largest activation of the step. On CPU that copy, and the backward it causes (a strided
gradient the output layer's matmuls must copy again), cost more than the whole CE + entropy.
The fused CE + entropy kernel (entropy.py) works in the memory order of whatever it is given,
so the copy buys nothing.

Deliberate choices:
- A forward hook on the output layer, held only for the duration of one call, returns the
  logits transposed (a view). GPTModel's own `transpose(0, 1).contiguous()` then gives back the
  original `[s, b, v/tp]` tensor without copying, and this function transposes that into the
  `[b, s, v/tp]` view callers expect. The result has the same shape and values as a plain call;
  only its strides differ. Should a future GPTModel do anything else with the tensor, the
  outcome stays correct and at worst copies, as today.
- Only the stage that owns the output layer (`post_process`) is touched: other pipeline
  stages return their hidden states unchanged.
- Multi-token prediction calls the output layer more than once per forward and feeds the
  results to Megatron's own loss; it is refused rather than silently transposed.
"""

import torch
from megatron.core.utils import unwrap_model


def forward_logits(
    model: torch.nn.Module,
    tokens: torch.Tensor,  # [b, s]
    position_ids: torch.Tensor,  # [b, s]
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`model(tokens, position_ids, attention_mask)` (no labels) without the logits copy.

    `model` is one (possibly DDP / Float16Module wrapped) GPTModel chunk. Returns the logits
    `[b, s, v/tp]` on the last stage (a view of `[s, b, v/tp]` memory), else the hidden states.
    """
    gpt = unwrap_model(model)
    if not gpt.post_process:
        return model(tokens, position_ids, attention_mask)
    if getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError("forward_logits does not support multi-token prediction")
    hook = gpt.output_layer.register_forward_hook(_transposed_output)
    try:
        logits = model(tokens, position_ids, attention_mask)  # [s, b, v/tp]
    finally:
        hook.remove()
    return logits.transpose(0, 1)


def _transposed_output(module, args, output):
    """Output layer's `(logits [s, b, v/tp], bias)` -> `(logits viewed as [b, s, v/tp], bias)`."""
    logits, bias = output
    return logits.transpose(0, 1), bias
