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
  plain path also produces. The price: one more `[N, h] x [h, v/tp]` matmul (the recompute)
  and a second exp pass.
- Unless the caller can say what gradient to expect (`expected_grad`): the NTP loss is
  lambda x the CE summed over the loss mask minus the few chosen RL positions, so the forward,
  which has each chunk's softmax anyway, also computes g = (softmax - onehot) / T, stores
  g @ W `[N, h]` (the input gradient per unit of upstream gradient) and accumulates
  g^T @ hidden weighted by the expected gradient. The backward scales both by the common factor
  (lambda) and recomputes only the rows where the actual gradient differs from the expected
  one: three matmuls and one exp pass in all, as the plain path. Wrong guesses cost time, never
  exactness (more than half the rows wrong: the full recompute above).
- Sequence parallelism is refused by the caller (model/logits.py): the hidden states would be a
  sequence shard.
"""

import torch
import torch.distributed as dist

from megatron_rmt.entropy import (
    _checked_group,
    _local_targets,
    _memory_order,
    _shifted_stats,
    _vocab_offset,
)


def linear_ce_entropy(
    hidden: torch.Tensor,  # [..., h] the output layer's input
    weight: torch.Tensor,  # [v/tp, h] this rank's vocabulary shard of the output weight
    labels: torch.Tensor,  # [...] global vocabulary ids
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
    expected_grad: torch.Tensor | None = None,  # [...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE of `labels` and entropy of softmax(hidden @ W^T / temperature), nats,
    fp32, as `vocab_parallel_ce_entropy(output_layer(hidden), labels)` gives them; only the loss
    carries a gradient (to `hidden` and `weight`). Token dimensions may be stored in any order.

    `expected_grad`: the gradient the loss is expected to receive, up to one common factor (the
    loss mask of a masked sum). The forward then computes the gradients for it while it has each
    chunk's softmax, and the backward only corrects the positions where it was wrong (the few
    chosen RL positions): no recompute. Exact for any gradient: with more than half the
    positions wrong the backward recomputes every chunk."""
    tp_group = _checked_group("hidden", hidden, labels, temperature, chunk_tokens, tp_group)
    # A Float16Module hands the last stage's output over in fp32; the projection runs in the
    # weight's dtype (a lossless round trip for bf16 hidden states).
    hidden = hidden.to(weight.dtype)
    order = _memory_order(hidden)
    expected = None if expected_grad is None else expected_grad.permute(*order)
    loss, entropy = _FusedLinearCEEntropy.apply(
        hidden.permute(*order, -1), weight, labels.permute(*order), expected, tp_group,
        temperature, chunk_tokens,
    )  # fmt: skip
    back = sorted(range(len(order)), key=order.__getitem__)
    return loss.permute(*back).contiguous(), entropy.permute(*back).contiguous()


class _Chunks:
    """Work buffers for one pass, allocated once: the chunk's logits in the weight's dtype,
    their fp32 copy (the same tensor for fp32 weights) and, for the forward, the fp32 exp
    buffer."""

    def __init__(self, rows: int, weight: torch.Tensor, with_exp: bool):
        v_local = weight.shape[0]
        self.logits = torch.empty(rows, v_local, dtype=weight.dtype, device=weight.device)
        fp32 = weight.dtype == torch.float32
        self.z = self.logits if fp32 else torch.empty_like(self.logits, dtype=torch.float32)
        self.e = torch.empty_like(self.z) if with_exp else None

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

    def low(self, g: torch.Tensor) -> torch.Tensor:
        """The fp32 chunk `g` in the weight's dtype (itself for fp32 weights)."""
        c = g.shape[0]
        return g if g.dtype == self.logits.dtype else self.logits[:c].copy_(g)


class _FusedLinearCEEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, expected, tp_group, temperature, chunk_tokens):
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, h]
        flat_labels = labels.reshape(-1)
        n, v_local = flat.shape[0], weight.shape[0]
        offset = _vocab_offset(v_local, tp_group)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.empty_like(loss), torch.empty_like(loss)
        ahead = expected is not None and any(ctx.needs_input_grad[:2])
        if ahead:  # (softmax - onehot) @ W / T per token, and the weight gradient for `expected`
            unit = torch.empty_like(flat)
            ahead_weight = torch.zeros_like(weight)
            w = expected.reshape(-1).to(weight.dtype)
        bufs = _Chunks(min(chunk_tokens, n), weight, with_exp=True)
        for start in range(0, n, chunk_tokens):
            stop = min(start + chunk_tokens, n)
            z = bufs.project(flat[start:stop], weight, temperature)
            e = bufs.e[: stop - start]
            z_max, stats = _shifted_stats(z, e, flat_labels[start:stop], offset, tp_group)
            log_sum = stats[0].log()
            lse[start:stop] = z_max + log_sum
            loss[start:stop] = log_sum - stats[2]
            entropy[start:stop] = log_sum - stats[1] / stats[0]
            if ahead:  # e holds exp(z - max): normalised by the global sum it is the softmax
                p = e.div_(stats[0].unsqueeze(-1))
                g = bufs.low(_minus_onehot(p, flat_labels[start:stop], offset).div_(temperature))
                torch.mm(g, weight, out=unit[start:stop])
                ahead_weight.addmm_(g.mul_(w[start:stop].unsqueeze(-1)).t(), flat[start:stop])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.temperature, ctx.chunk_tokens = tp_group, temperature, chunk_tokens
        ctx.ahead = (unit, ahead_weight, expected.reshape(-1)) if ahead else None
        entropy = entropy.view(labels.shape)
        ctx.mark_non_differentiable(entropy)
        return loss.view(labels.shape), entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        t, chunk, group = ctx.temperature, ctx.chunk_tokens, ctx.tp_group
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, h]
        flat_labels = labels.reshape(-1)
        upstream = grad_loss.reshape(-1).to(torch.float32)  # [N]
        offset = _vocab_offset(weight.shape[0], group)
        ahead, ctx.ahead = ctx.ahead, None
        if ahead is not None:
            unit, grad_weight, expected = ahead
            alpha = _common_factor(upstream, expected)
            diff = upstream - alpha * expected  # non-zero where the guess was wrong
            rows = diff.nonzero().flatten()
            if rows.numel() <= flat.shape[0] // 2:
                grad_hidden = unit.mul_(upstream.unsqueeze(-1).to(unit.dtype))
                grad_weight.mul_(alpha)
                _accumulate(
                    flat[rows], weight, flat_labels[rows], lse[rows], diff[rows] / t, offset, t,
                    chunk, grad_weight,
                )  # fmt: skip
                return _finish(grad_hidden, grad_weight, hidden, group)
        grad_hidden = torch.empty_like(flat)
        grad_weight = torch.zeros_like(weight)
        _accumulate(
            flat, weight, flat_labels, lse, upstream / t, offset, t, chunk, grad_weight,
            grad_hidden,
        )  # fmt: skip
        return _finish(grad_hidden, grad_weight, hidden, group)


def _minus_onehot(p: torch.Tensor, labels: torch.Tensor, offset: int) -> torch.Tensor:
    """softmax - onehot(labels) in place, on this rank's vocabulary columns."""
    rows, cols = _local_targets(labels, offset, p.shape[-1])
    p[rows, cols] -= 1.0
    return p


def _common_factor(upstream: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The factor alpha with upstream == alpha * expected at most positions (the median ratio)."""
    nonzero = expected != 0
    if not bool(nonzero.any()):
        return torch.zeros((), device=upstream.device)
    return (upstream[nonzero] / expected[nonzero].to(torch.float32)).median()


def _accumulate(flat, weight, labels, lse, scale, offset, t, chunk, grad_weight, grad_hidden=None):
    """Recompute the logits of `flat` `[n, h]` chunk by chunk and add g^T @ flat to grad_weight
    (and write g @ W to grad_hidden), g = (softmax - onehot) * scale."""
    n = flat.shape[0]
    if n == 0:
        return
    bufs = _Chunks(min(chunk, n), weight, with_exp=False)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        h = flat[start:stop]
        p = bufs.project(h, weight, t).sub_(lse[start:stop].unsqueeze(-1)).exp_()
        g = _minus_onehot(p, labels[start:stop], offset).mul_(scale[start:stop].unsqueeze(-1))
        g = bufs.low(g)
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:stop])
        grad_weight.addmm_(g.t(), h)


def _finish(grad_hidden, grad_weight, hidden, group):
    """The input gradient summed over TP (each rank saw its vocabulary shard only)."""
    if group is not None:
        dist.all_reduce(grad_hidden, group=group)
    return grad_hidden.view(hidden.shape), grad_weight, None, None, None, None, None
