"""Output projection + cross-entropy + entropy, chunked over tokens: the logits never all live.

The NTP pass's usual path materialises GPTModel's `[s, b, v/tp]` logits (1.2 GiB in bf16 per
4096-token microbatch at a 151,936-word vocabulary) and then reads them chunk by chunk
(entropy.py). Here the output layer's input (the final hidden states) and weight come in
instead, and each chunk of `chunk_tokens` positions is projected, reduced and dropped:

- Forward: per chunk, logits = hidden @ W^T in the weight's dtype (as the output layer computes
  them), then the same fp32 statistics as entropy.py (global max, sum exp, sum exp * z, target
  logit, all-reduced over TP; `_shifted_stats`), giving CE, entropy and the log-sum-exp. Saved:
  the hidden states, the weight, the labels and the fp32 log-sum-exp `[N]`.
- Backward: per chunk, the logits are recomputed, the softmax rebuilt from the saved
  log-sum-exp, g = (softmax - onehot) * upstream / T (fp32, then the weight's dtype, as the
  plain path's logits gradient is), grad_hidden = g @ W and grad_W += g^T @ hidden. grad_W
  accumulates in the weight's dtype, as the plain path's single matmul returns it: with bf16
  weights it is rounded once per chunk instead of once (matmuls accumulate in fp32 inside).
  grad_hidden is all-reduced over TP, as the vocabulary-parallel output layer's input gradient
  is (Megatron's copy-to-TP-region).
- Live memory: O(chunk x v/tp) work buffers plus the `[v/tp, h]` weight gradient, which the
  plain path also produces. The price: one more `[N, h] x [h, v/tp]` matmul (the recompute).
- Sequence parallelism is refused by the caller (model/logits.py): the hidden states would be a
  sequence shard.
"""

import torch
import torch.distributed as dist

from megatron_rmt.entropy import _local_targets, _memory_order, _shifted_stats, _vocab_offset


def linear_ce_entropy(
    hidden: torch.Tensor,  # [..., h] the output layer's input
    weight: torch.Tensor,  # [v/tp, h] this rank's vocabulary shard of the output weight
    labels: torch.Tensor,  # [...] global vocabulary ids
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE of `labels` and entropy of softmax(hidden @ W^T / temperature), nats,
    fp32, as `vocab_parallel_ce_entropy(output_layer(hidden), labels)` gives them; only the loss
    carries a gradient (to `hidden` and `weight`). Token dimensions may be stored in any order."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    # A Float16Module hands the last stage's output over in fp32; the projection runs in the
    # weight's dtype (a lossless round trip for bf16 hidden states).
    hidden = hidden.to(weight.dtype)
    order = _memory_order(hidden)
    loss, entropy = _FusedLinearCEEntropy.apply(
        hidden.permute(*order, -1), weight, labels.permute(*order), tp_group, temperature,
        chunk_tokens,
    )  # fmt: skip
    back = sorted(range(len(order)), key=order.__getitem__)
    return loss.permute(*back).contiguous(), entropy.permute(*back).contiguous()


class _Chunks:
    """Work buffers for one pass: the chunk's logits in the weight's dtype, their fp32 copy
    (the same tensor for fp32 weights) and the fp32 exp buffer, allocated once."""

    def __init__(self, rows: int, weight: torch.Tensor):
        v_local = weight.shape[0]
        self.logits = torch.empty(rows, v_local, dtype=weight.dtype, device=weight.device)
        fp32 = weight.dtype == torch.float32
        self.z = self.logits if fp32 else torch.empty_like(self.logits, dtype=torch.float32)
        self.e = torch.empty_like(self.z)

    def project(self, h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 logits / temperature of the chunk `h` `[c, h]`, in the z buffer."""
        c = h.shape[0]
        logits = torch.mm(h, weight.t(), out=self.logits[:c])
        z = self.z[:c]
        if z.data_ptr() != logits.data_ptr():
            z.copy_(logits)
        if temperature != 1.0:
            z.div_(temperature)
        return z


class _FusedLinearCEEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, temperature, chunk_tokens):
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, h]
        flat_labels = labels.reshape(-1)
        n = flat.shape[0]
        offset = _vocab_offset(weight.shape[0], tp_group)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.empty_like(loss), torch.empty_like(loss)
        bufs = _Chunks(min(chunk_tokens, n), weight)
        for start in range(0, n, chunk_tokens):
            stop = min(start + chunk_tokens, n)
            z = bufs.project(flat[start:stop], weight, temperature)
            e = bufs.e[: stop - start]
            z_max, stats = _shifted_stats(z, e, flat_labels[start:stop], offset, tp_group)
            log_sum = stats[0].log()
            lse[start:stop] = z_max + log_sum
            loss[start:stop] = log_sum - stats[2]
            entropy[start:stop] = log_sum - stats[1] / stats[0]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.temperature, ctx.chunk_tokens = tp_group, temperature, chunk_tokens
        entropy = entropy.view(labels.shape)
        ctx.mark_non_differentiable(entropy)
        return loss.view(labels.shape), entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_tokens
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, h]
        flat_labels = labels.reshape(-1)
        scale = grad_loss.reshape(-1).to(torch.float32) / t  # [N]
        n, v_local = flat.shape[0], weight.shape[0]
        offset = _vocab_offset(v_local, ctx.tp_group)
        grad_hidden = torch.empty_like(flat)
        grad_weight = torch.zeros_like(weight)
        bufs = _Chunks(min(chunk, n), weight)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = flat[start:stop]
            p = bufs.project(h, weight, t).sub_(lse[start:stop].unsqueeze(-1)).exp_()
            rows, cols = _local_targets(flat_labels[start:stop], offset, v_local)
            p[rows, cols] -= 1.0
            g = p.mul_(scale[start:stop].unsqueeze(-1))  # [c, v/tp] fp32
            g_low = g if g.dtype == weight.dtype else bufs.logits[: stop - start].copy_(g)
            torch.mm(g_low, weight, out=grad_hidden[start:stop])
            grad_weight.addmm_(g_low.t(), h)
        if ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return grad_hidden.view(hidden.shape), grad_weight, None, None, None, None
