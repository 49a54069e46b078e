"""Fused vocab-parallel cross-entropy and entropy, chunked over tokens.

The NTP forward pass ends in logits sharded over the vocabulary across the tensor-parallel
group (each rank holds `v/tp` consecutive ids, rank r owning `[r * v/tp, (r + 1) * v/tp)`).
From them this computes, per position, the cross-entropy of the label (the NTP loss) and the
Shannon entropy of the whole predictive distribution (the difficulty signal), both in nats.

Deliberate choices:
- One `torch.autograd.Function`. The forward visits `chunk_tokens` positions at a time, works in
  fp32 and all-reduces four per-token numbers over TP: the max logit, then (sum exp,
  sum exp * z, target logit) in one call. The full vocabulary is never gathered. The only work
  buffer is one fp32 `[chunk, v/tp]` tensor, allocated once and reused: on CPU a chunk small
  enough to stay in cache (e.g. 16 tokens for a 50k vocabulary) makes the passes over it cheap.
- Two ways to the gradient `(softmax - onehot) / T`, which needs no communication because the
  normaliser is already global:
  * fp32 logits handed over (`inplace_backward`, contiguous in memory order): the chunk is
    shifted and scaled in place and the softmax written back over it, as Megatron's own
    vocab_parallel_cross_entropy does; the backward is then two cheap passes, no exp. The
    buffer holds exp(z), so sum exp * z is a multiply and a row sum (xlogy's log per element
    cost more than the whole cross-entropy on CPU).
  * otherwise (bf16/fp16 logits, or logits the caller keeps): only the logits and the
    per-token log-sum-exp (fp32 `[N]`) are saved, and the backward recomputes the softmax
    chunk by chunk in fp32, so low-precision logits lose nothing and no fp32 `[N, v/tp]` tensor
    ever exists. With `inplace_backward` the gradient overwrites the logits chunk by chunk.
- The token dimensions are processed in the order they are stored, so logits that are a
  transposed view (GPTModel's `[s, b, v]` output seen as `[b, s, v]`, see model/logits.py) are
  neither copied nor strided through.
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
    `inplace_backward=True` hands the logits over to this function, as Megatron's
    vocab_parallel_cross_entropy takes them: fp32 logits are overwritten with the softmax
    during the forward, and any logits with their gradient during the backward. Only for logits
    nothing else reads afterwards, such as GPTModel's output. A second backward through the same
    graph then fails loudly (autograd sees the saved logits were modified).
    The token dimensions may be stored in any order (e.g. a `[b, s, v]` view of `[s, b, v]`
    memory): the work follows the memory order, so such a view is never copied.
    """
    tp_group = _checked_group("logits", logits, labels, temperature, chunk_tokens, tp_group)
    order = _memory_order(logits)
    loss, entropy = _FusedCEEntropy.apply(
        logits.permute(*order, -1),
        labels.permute(*order),
        tp_group,
        temperature,
        chunk_tokens,
        inplace_backward,
    )
    back = sorted(range(len(order)), key=order.__getitem__)  # inverse permutation
    return loss.permute(*back).contiguous(), entropy.permute(*back).contiguous()


def _checked_group(name: str, x, labels, temperature: float, chunk_tokens: int, tp_group):
    """The kernels' shared argument checks (ValueError); returns `tp_group`, None when it is one
    rank (nothing to reduce)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if x.shape[:-1] != labels.shape:
        raise ValueError(f"{name} {tuple(x.shape)} do not match labels {tuple(labels.shape)}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        return None
    return tp_group


def _memory_order(logits: torch.Tensor) -> list[int]:
    """The token dimensions by decreasing stride: permuted so, the logits are contiguous
    whenever their storage is dense (identity for ordinary contiguous logits)."""
    return sorted(range(logits.dim() - 1), key=lambda d: -logits.stride(d))


def _vocab_offset(v_local: int, tp_group: dist.ProcessGroup | None) -> int:
    """First global vocabulary id held by this rank."""
    return 0 if tp_group is None else dist.get_rank(tp_group) * v_local


def _local_targets(labels: torch.Tensor, offset: int, v_local: int):
    """Rows whose label lives on this shard, and that label's local column."""
    local = labels - offset  # [n]
    rows = ((local >= 0) & (local < v_local)).nonzero(as_tuple=True)[0]  # [n_hit]
    return rows, local[rows]


def _workspace(rows: int, v_local: int, device: torch.device) -> torch.Tensor:
    """One fp32 `[rows, v/tp]` chunk buffer, reused by every chunk (fresh memory per chunk
    would cost page faults on CPU)."""
    return torch.empty(rows, v_local, dtype=torch.float32, device=device)


def _shifted_stats(
    z: torch.Tensor,  # [c, v/tp] fp32 logits / temperature; overwritten
    e: torch.Tensor | None,  # [c, v/tp] fp32 buffer for exp(z - global max), or None
    labels: torch.Tensor,  # [c]
    offset: int,
    tp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global max `[c]` and `stats [3, c]` = (sum e, sum e * z, target z), z shifted by the max,
    all-reduced over TP. With a buffer `e`, sum e * z is a multiply into z's storage and a row
    sum (e is kept); without one, z becomes e in place and the sum is `xlogy(e, e)`: a log per
    element (slow on CPU) in exchange for one `[c, v/tp]` buffer less."""
    z_max = z.amax(dim=-1)  # [c]
    if tp_group is not None:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
    z.sub_(z_max.unsqueeze(-1))
    stats = torch.zeros(3, z.shape[0], dtype=torch.float32, device=z.device)
    rows, cols = _local_targets(labels, offset, z.shape[-1])
    stats[2, rows] = z[rows, cols]
    if e is None:
        e = z.exp_()
        stats[0] = e.sum(dim=-1)
        stats[1] = e.xlogy_(e).sum(dim=-1)  # 0 where e underflowed: the limit of e * z
    else:
        torch.exp(z, out=e)
        stats[0] = e.sum(dim=-1)
        stats[1] = torch.mul(e, z, out=z).sum(dim=-1)
    if tp_group is not None:
        dist.all_reduce(stats, group=tp_group)
    return z_max, stats


class _FusedCEEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, temperature, chunk_tokens, inplace_backward):
        v_local = logits.shape[-1]
        flat = logits.reshape(-1, v_local)  # [N, v/tp]
        flat_labels = labels.reshape(-1)  # [N]
        n_tokens = flat.shape[0]
        offset = _vocab_offset(v_local, tp_group)
        # fp32 logits that the caller gives up: work in their storage and leave the softmax there.
        keep_softmax = inplace_backward and logits.dtype == torch.float32 and logits.is_contiguous()
        loss = torch.empty(n_tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(loss)
        lse = torch.empty_like(loss)
        # One fp32 chunk buffer either way: exp(z) beside the logits' own storage, or the fp32
        # copy of the chunk that becomes exp(z) in place (O(chunk) memory, as before).
        buf = _workspace(min(chunk_tokens, n_tokens), v_local, logits.device)
        for start in range(0, n_tokens, chunk_tokens):
            stop = min(start + chunk_tokens, n_tokens)
            chunk = flat[start:stop]  # [c, v/tp]
            z = chunk if keep_softmax else buf[: stop - start].copy_(chunk)
            if temperature != 1.0:
                z.div_(temperature)
            e = buf[: stop - start] if keep_softmax else None
            z_max, stats = _shifted_stats(z, e, flat_labels[start:stop], offset, tp_group)
            if keep_softmax:
                torch.div(e, stats[0].unsqueeze(-1), out=chunk)
            log_sum = stats[0].log()
            # z is shifted by the global max: lse = max + log sum, H = log sum - E_p[z - max].
            lse[start:stop] = z_max + log_sum
            loss[start:stop] = log_sum - stats[2]
            entropy[start:stop] = log_sum - stats[1] / stats[0]
        # The input itself is saved (not `flat`, a view autograd would refuse after the in-place
        # backward); in the keep_softmax case it now holds the softmax.
        ctx.save_for_backward(logits, labels, None if keep_softmax else lse)
        ctx.keep_softmax = keep_softmax
        ctx.tp_group = tp_group
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.inplace_backward = inplace_backward
        entropy = entropy.view(labels.shape)
        ctx.mark_non_differentiable(entropy)
        return loss.view(labels.shape), entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        scale = grad_loss.reshape(-1).to(torch.float32) / ctx.temperature  # [N]
        logits, labels, lse = ctx.saved_tensors
        if ctx.keep_softmax:
            grad = _grad_from_softmax(
                logits.view(-1, logits.shape[-1]), labels, scale, ctx.tp_group
            )
            return grad.view(logits.shape), None, None, None, None, None
        grad = _grad_by_recompute(
            logits, labels, lse, scale, ctx.tp_group, ctx.temperature, ctx.chunk_tokens,
            ctx.inplace_backward,
        )  # fmt: skip
        return grad.view(logits.shape), None, None, None, None, None


def _grad_from_softmax(
    softmax: torch.Tensor,  # [N, v/tp] fp32, overwritten with the gradient
    labels: torch.Tensor,  # [...] N labels
    scale: torch.Tensor,  # [N] upstream gradient / temperature
    tp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """(softmax - onehot) * scale in place: two passes, no exp (Megatron's CE backward)."""
    v_local = softmax.shape[-1]
    rows, cols = _local_targets(labels.reshape(-1), _vocab_offset(v_local, tp_group), v_local)
    softmax[rows, cols] -= 1.0
    return softmax.mul_(scale.unsqueeze(-1))


def _grad_by_recompute(
    logits: torch.Tensor,  # [..., v/tp] any float dtype, as given to the forward
    labels: torch.Tensor,  # [...]
    lse: torch.Tensor,  # [N] fp32 global log-sum-exp of logits / temperature
    scale: torch.Tensor,  # [N]
    tp_group: dist.ProcessGroup | None,
    temperature: float,
    chunk_tokens: int,
    inplace: bool,
) -> torch.Tensor:
    """(softmax - onehot) * scale with the softmax recomputed chunk by chunk in fp32: the
    precision of fp32 math for low-precision logits, O(chunk) extra memory. Returns `[N, v/tp]`
    in the logits' dtype; in place, each chunk's logits are read before its gradient
    overwrites them."""
    v_local = logits.shape[-1]
    flat = logits.reshape(-1, v_local)  # [N, v/tp]
    flat_labels = labels.reshape(-1)  # [N]
    offset = _vocab_offset(v_local, tp_group)
    grad = flat if inplace else torch.empty_like(flat)
    p_buf = _workspace(min(chunk_tokens, flat.shape[0]), v_local, logits.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        stop = min(start + chunk_tokens, flat.shape[0])
        p = p_buf[: stop - start].copy_(flat[start:stop])  # [c, v/tp]
        if temperature != 1.0:
            p.div_(temperature)
        p.sub_(lse[start:stop].unsqueeze(-1)).exp_()
        rows, cols = _local_targets(flat_labels[start:stop], offset, v_local)
        p[rows, cols] -= 1.0
        grad[start:stop] = p.mul_(scale[start:stop].unsqueeze(-1))
    return grad
