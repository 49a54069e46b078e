"""Fused vocab-parallel cross-entropy and entropy, chunked over tokens.

The NTP forward pass ends in logits sharded over the vocabulary across the tensor-parallel
group (each rank holds `v/tp` consecutive ids, rank r owning `[r * v/tp, (r + 1) * v/tp)`).
From them this computes, per position, the cross-entropy of the label (the NTP loss) and the
Shannon entropy of the whole predictive distribution (the difficulty signal), both in nats.

Deliberate choices:
- One `torch.autograd.Function`. The forward visits `chunk_tokens` positions at a time, upcasts
  that chunk to fp32 and all-reduces four per-token numbers over TP: the max logit, then
  (sum exp, sum exp * z, target logit) in one call. The full vocabulary is never gathered and no
  fp32 `[tokens, v/tp]` tensor ever exists: forward and backward each work in a single reused
  fp32 `[chunk, v/tp]` buffer, so peak extra memory is O(chunk x v/tp).
- Only the input logits and the per-token log-sum-exp (fp32 `[N]`) are saved. The backward
  recomputes the softmax chunk by chunk from them. Because the saved log-sum-exp is already the
  global one, each rank's gradient `(softmax - onehot) / T` needs no communication. Optionally
  the gradient overwrites the logits (they are dead after the backward), which removes the last
  `[N, v/tp]` allocation; the chunk's fp32 work buffers are then the only extra memory.
- Entropy is returned detached (marked non-differentiable): it drives selection and metrics,
  never a loss.
- `temperature` divides the logits before everything, so with the sampling temperature `-loss`
  is the log-probability the rollout engine sampled from (GRPO's log pi).
- Labels outside `[0, v)` (e.g. an ignore index) have target logit 0 on every rank and so a
  meaningless loss: the caller masks them, as it masks padding anyway.
"""

import torch
import torch.distributed as dist


def vocab_parallel_ce_entropy(
    logits: torch.Tensor,  # [..., v/tp]
    labels: torch.Tensor,  # [...] global vocabulary ids
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE of `labels` and entropy of softmax(logits / temperature), nats, fp32.

    `tp_group` is the tensor-parallel group the vocabulary is sharded over (None: no TP).
    Returns `(loss [...], entropy [...])`; only `loss` carries a gradient.
    `inplace_backward=True` writes the gradient into the logits' own storage (as Megatron's
    vocab_parallel_cross_entropy does), saving one `[N, v/tp]` tensor: only for logits nothing
    reads after the backward, such as GPTModel's output. A second backward through the same graph
    then fails loudly (autograd sees the saved logits were modified).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    return _FusedCEEntropy.apply(
        logits, labels, tp_group, temperature, chunk_tokens, inplace_backward
    )


def _vocab_offset(v_local: int, tp_group: dist.ProcessGroup | None) -> int:
    """First global vocabulary id held by this rank."""
    return 0 if tp_group is None else dist.get_rank(tp_group) * v_local


def _local_targets(labels: torch.Tensor, offset: int, v_local: int):
    """Rows whose label lives on this shard, and that label's local column."""
    local = labels - offset  # [n]
    rows = ((local >= 0) & (local < v_local)).nonzero(as_tuple=True)[0]  # [n_hit]
    return rows, local[rows]


def _workspace(rows: int, v_local: int, device: torch.device) -> torch.Tensor:
    """The fp32 `[rows, v/tp]` buffer: the only vocabulary-sized fp32 memory used."""
    return torch.empty(rows, v_local, dtype=torch.float32, device=device)


def _scaled_fp32(chunk: torch.Tensor, temperature: float, buf: torch.Tensor) -> torch.Tensor:
    """chunk / temperature in fp32, written into `buf` (never into the caller's logits)."""
    z = buf[: chunk.shape[0]]  # [c, v/tp]
    z.copy_(chunk)
    return z if temperature == 1.0 else z.div_(temperature)


class _FusedCEEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, temperature, chunk_tokens, inplace_backward):
        v_local = logits.shape[-1]
        flat = logits.reshape(-1, v_local)  # [N, v/tp]
        flat_labels = labels.reshape(-1)  # [N]
        n_tokens = flat.shape[0]
        offset = _vocab_offset(v_local, tp_group)
        loss = torch.empty(n_tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(loss)
        lse = torch.empty_like(loss)
        # One fp32 work buffer reused by every chunk: allocating per chunk costs page faults.
        buf = _workspace(min(chunk_tokens, n_tokens), v_local, logits.device)
        for start in range(0, n_tokens, chunk_tokens):
            stop = min(start + chunk_tokens, n_tokens)
            z = _scaled_fp32(flat[start:stop], temperature, buf)  # [c, v/tp]
            z_max = z.amax(dim=-1)  # [c]
            if tp_group is not None:
                dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
            z.sub_(z_max.unsqueeze(-1))
            # stats[0] = sum exp(z), stats[1] = sum exp(z) * z, stats[2] = target logit.
            stats = torch.zeros(3, stop - start, dtype=torch.float32, device=logits.device)
            rows, cols = _local_targets(flat_labels[start:stop], offset, v_local)
            stats[2, rows] = z[rows, cols]
            # Everything in place in the one buffer: e = exp(z), then e * z = e * log(e)
            # (xlogy is 0 where e underflowed to 0, which is the limit of e * z there).
            exp_z = z.exp_()
            stats[0] = exp_z.sum(dim=-1)
            stats[1] = exp_z.xlogy_(exp_z).sum(dim=-1)
            if tp_group is not None:
                dist.all_reduce(stats, group=tp_group)
            log_sum = stats[0].log()
            # z is shifted by the global max: lse = max + log sum, H = log sum - E_p[z - max].
            lse[start:stop] = z_max + log_sum
            loss[start:stop] = log_sum - stats[2]
            entropy[start:stop] = log_sum - stats[1] / stats[0]
        ctx.save_for_backward(logits, labels, lse)
        ctx.tp_group = tp_group
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.inplace_backward = inplace_backward
        entropy = entropy.view(labels.shape)
        ctx.mark_non_differentiable(entropy)
        return loss.view(labels.shape), entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        v_local = logits.shape[-1]
        flat = logits.reshape(-1, v_local)  # [N, v/tp]
        flat_labels = labels.reshape(-1)  # [N]
        scale = grad_loss.reshape(-1).to(torch.float32) / ctx.temperature  # [N]
        offset = _vocab_offset(v_local, ctx.tp_group)
        # In place, each chunk's logits are read into p before its gradient overwrites them.
        grad = flat if ctx.inplace_backward else torch.empty_like(flat)
        p_buf = _workspace(min(ctx.chunk_tokens, flat.shape[0]), v_local, logits.device)
        for start in range(0, flat.shape[0], ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, flat.shape[0])
            p = _scaled_fp32(flat[start:stop], ctx.temperature, p_buf)  # [c, v/tp]
            p.sub_(lse[start:stop].unsqueeze(-1)).exp_()
            rows, cols = _local_targets(flat_labels[start:stop], offset, v_local)
            p[rows, cols] -= 1.0
            grad[start:stop] = p.mul_(scale[start:stop].unsqueeze(-1))
        return grad.view(logits.shape), None, None, None, None, None
