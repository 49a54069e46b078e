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
- `rows` (optional): only the logits of the positions it lists are computed, by gathering the
  output layer's input hidden states first (a forward pre-hook, held like the other one). The
  RL pass needs only the response tokens' log-probs; a shared-prefix group would otherwise pay
  the vocabulary projection for its whole prompt.
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
    rows: torch.Tensor | None = None,  # [b, n] positions whose logits are wanted
) -> torch.Tensor:
    """`model(tokens, position_ids, attention_mask)` (no labels) without the logits copy.

    `model` is one (possibly DDP / Float16Module wrapped) GPTModel chunk. Returns the logits
    `[b, s, v/tp]` on the last stage (a view of `[s, b, v/tp]` memory), or `[b, n, v/tp]` with
    logits[i, k] those of position rows[i, k], else the hidden states.
    """
    gpt = unwrap_model(model)
    if not gpt.post_process:
        return model(tokens, position_ids, attention_mask)
    if getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError("forward_logits does not support multi-token prediction")
    if rows is not None and gpt.config.sequence_parallel:
        raise ValueError("forward_logits: rows with sequence parallelism is not supported")
    hooks = [gpt.output_layer.register_forward_hook(_transposed_output)]
    if rows is not None:
        hooks.append(gpt.output_layer.register_forward_pre_hook(_gather(rows), with_kwargs=True))
    try:
        logits = model(tokens, position_ids, attention_mask)  # [s or n, b, v/tp]
    finally:
        for hook in hooks:
            hook.remove()
    return logits.transpose(0, 1)


def _gather(rows: torch.Tensor):  # [b, n]
    """Pre-hook: the output layer's input `[s, b, h]` -> `[n, b, h]`, the listed positions."""
    batch = torch.arange(rows.shape[0], device=rows.device)

    def hook(module, args, kwargs):
        hidden, *rest = args
        return (hidden[rows.t(), batch], *rest), kwargs

    return hook


def _transposed_output(module, args, output):
    """Output layer's `(logits [s, b, v/tp], bias)` -> `(logits viewed as [b, s, v/tp], bias)`."""
    logits, bias = output
    return logits.transpose(0, 1), bias


def forward_hidden(
    model: torch.nn.Module,
    tokens: torch.Tensor,  # [b, s]
    position_ids: torch.Tensor,  # [b, s]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model`'s forward without the output projection: on the last stage the output layer's
    input `[b, s, h]` (a view of `[s, b, h]` memory) and the weight it would have used (its own,
    or the tied embedding's), for a caller that projects them itself (fused_linear.py); on other
    stages (hidden states, None).

    For one call the output layer's forward is shadowed by one that passes its input through
    (transposed, as `_transposed_output` does, so GPTModel's `transpose(0, 1).contiguous()` does
    not copy) and records the weight; no logits are computed."""
    gpt = unwrap_model(model)
    if not gpt.post_process:
        return model(tokens, position_ids, None), None
    if getattr(gpt.config, "mtp_num_layers", None) or gpt.config.sequence_parallel:
        raise ValueError("forward_hidden supports neither multi-token prediction nor SP")
    layer, used = gpt.output_layer, []

    def passthrough(hidden, weight=None, **kwargs):  # hidden [s, b, h]
        used.append(layer.weight if weight is None else weight)
        return hidden.transpose(0, 1), None

    layer.forward = passthrough
    try:
        hidden = model(tokens, position_ids, None)  # [s, b, h]
    finally:
        del layer.forward
    return hidden.transpose(0, 1), used[0]
