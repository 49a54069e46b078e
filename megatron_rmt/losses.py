"""RMT's loss terms and how they meet Megatron-Core's loss_func contract.

L = L_RL + lambda * L_NTP (paper Eq. 9), each term normalised by its own global count:
L_NTP = mean CE over every NTP token of the step (all micro-batches, all DP ranks) that is not a
chosen RL position (Eq. 8's m_pos); L_RL = GRPO's policy loss averaged over all response tokens
(token aggregation) or over all responses (sequence aggregation: each response's mean first).

The pure functions take per-token log-probs already computed by entropy.py (logp = -CE at the
sampling temperature) and return `(sum, count)` pairs, so the caller decides the normaliser.

Megatron contract. Megatron's schedule calls `loss_func(output_tensor) -> (loss, num_tokens,
report)` once per micro-batch on the last pipeline stage and backpropagates `loss` as given.
1. The trainer sets `calculate_per_token_loss=True` on the model config. Then the schedule divides
   `loss` neither by `num_tokens` nor by the number of micro-batches, and Megatron's DDP *sums*
   gradients over data-parallel ranks instead of averaging them.
2. It sets `finalize_model_grads_func=None`, so neither pass reduces or rescales gradients on its
   own; it calls `finalize_model_grads` itself, once, after both passes (without num_tokens).
3. NTP pass: `make_ntp_loss_func(...)` returns `(lambda * sum_ntp_ce, n_ntp, report)`. The
   gradient buffers now hold lambda * d(sum_ntp_ce) for this rank. The trainer adds up
   `report["ntp_tokens"]` over its micro-batches, broadcasts it from the last pipeline stage
   (only that stage computes losses), all-reduces it over DP to N_ntp, and scales every model
   chunk's gradient buffers by 1 / N_ntp (`DistributedDataParallel.scale_gradients`).
4. RL pass: the rollouts are finished before it starts, so N_rl (response tokens, or responses,
   summed over DP with `rl_count`) is known in advance; `make_rl_loss_func(...)` returns
   `(sum_rl / N_rl, n_rl, report)`, which accumulates on top of the scaled NTP gradients.
5. `finalize_model_grads` sums over DP: grad = lambda * d(sum_ntp)/N_ntp + d(sum_rl)/N_rl, the
   gradient of L. Both counts travel in the reports for the RL/NTP token ratio metric.
Truncated importance sampling (`tis_cap` C, off by default): the sampler's log-probs differ
from the trainer's (other kernels, bf16, padded vocabulary rows, and one version of weights
behind under one-step-ahead rollouts), so each response token's policy-gradient term is weighted
by w = min(exp(logp_old - logp_sampler), C), detached, where logp_old is the trainer's log-prob
at the weights the step starts from. The RL pass runs once per step, before the optimizer step,
so logp_old is the pass's own log-prob, detached: no extra forward. With PPO clipping the ratio
is then taken against logp_old (decoupled PPO, as verl and slime do): the clip bounds the
trainer's own update and w corrects for the sampler; one pass per step makes that ratio exactly
1, so the clip never binds and the gradient is that of -w A logp (docs/rollout.md).

The loss functions let the CE kernel reuse the logits' memory (`inplace_backward`: fp32 logits
hold the softmax from the forward on, then the gradient): the logits (`model.logits.forward_logits`,
a view of the output layer's own output) are read by nothing else, and the output layer's
backward needs its input and weight, not its output. Megatron's own fused cross-entropy clobbers
them the same way.
"""

from collections.abc import Callable

import torch

from megatron_rmt.entropy import vocab_parallel_ce_entropy


def ntp_loss_sum(
    token_loss: torch.Tensor,  # [b, s] per-token CE
    loss_mask: torch.Tensor,  # [b, s] 1 on real labels
    rl_mask: torch.Tensor,  # [b, s] bool, the chosen RL positions C
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: (sum of CE over kept positions, their count); C is masked out."""
    keep = (loss_mask > 0) & ~rl_mask.bool()  # [b, s]
    return (token_loss * keep).sum(), keep.sum().to(torch.int)


def rl_count(resp_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The RL normaliser's local part: response tokens ('token') or non-empty responses
    ('sequence') in `resp_mask` `[n, L]`. The trainer sums it over DP before the RL pass."""
    if aggregation == "token":
        return (resp_mask > 0).sum().to(torch.int)
    if aggregation == "sequence":
        return (resp_mask > 0).any(dim=1).sum().to(torch.int)
    raise ValueError(f"aggregation must be 'token' or 'sequence', not {aggregation!r}")


def aggregate(
    values: torch.Tensor,  # [n, L] per-token loss
    resp_mask: torch.Tensor,  # [n, L] 1 on response tokens
    aggregation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count): token = sum over all response tokens; sequence = sum over responses of
    each response's mean (empty responses add 0 and are not counted)."""
    mask = (resp_mask > 0).to(values.dtype)  # [n, L]
    count = rl_count(resp_mask, aggregation)
    if aggregation == "token":
        return (values * mask).sum(), count
    per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [n]
    return per_sequence.sum(), count


def policy_loss(
    logp: torch.Tensor,  # [n, L] log pi(o_t | ...) of the sampled tokens
    old_logp: torch.Tensor | None,  # [n, L] rollout log-probs, used with clip_eps or tis_cap
    adv: torch.Tensor,  # [n] one advantage per response
    resp_mask: torch.Tensor,  # [n, L]
    aggregation: str = "token",
    clip_eps: float | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO policy loss (sum, count): -A * logp, or with `clip_eps` PPO's clipped surrogate
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp). With `tis_cap` C
    every token's term is multiplied by w = min(exp(logp_old - old_logp), C) (`tis_weight`,
    detached), logp_old = logp detached, and rho is taken against logp_old instead of the
    rollout's log-probs (see the module docstring)."""
    a = adv.to(logp.dtype).unsqueeze(1)  # [n, 1]
    if (clip_eps is not None or tis_cap is not None) and old_logp is None:
        raise ValueError("clip_eps and tis_cap need the rollout log-probs (old_logp)")
    proximal = old_logp if tis_cap is None else logp.detach()
    if clip_eps is None:
        per_token = -a * logp
    else:
        ratio = torch.exp(logp - proximal)
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        per_token = -torch.minimum(ratio * a, clipped * a)
    if tis_cap is not None:
        per_token = per_token * tis_weight(logp.detach(), old_logp, resp_mask, tis_cap)
    return aggregate(per_token, resp_mask, aggregation)


def tis_log_ratio(
    logp_old: torch.Tensor,  # [n, L] the trainer's log-probs at the step's starting weights
    sampler_logp: torch.Tensor,  # [n, L] the rollout's
    resp_mask: torch.Tensor,  # [n, L]
) -> torch.Tensor:
    """log(pi_trainer / pi_sampler) per response token, 0 off the responses `[n, L]` (no
    overflow from padding positions, whose rollout log-prob is a placeholder 0)."""
    return torch.where(resp_mask > 0, logp_old - sampler_logp, torch.zeros_like(logp_old))


def tis_weight(
    logp_old: torch.Tensor,  # [n, L]
    sampler_logp: torch.Tensor,  # [n, L]
    resp_mask: torch.Tensor,  # [n, L]
    cap: float,
) -> torch.Tensor:
    """Truncated importance weight min(pi_trainer / pi_sampler, cap) per token `[n, L]`, no
    gradient (1 off the responses)."""
    ratio = torch.exp(tis_log_ratio(logp_old, sampler_logp, resp_mask))
    return torch.clamp(ratio, max=cap).detach()


def kl_penalty(
    logp: torch.Tensor,  # [n, L]
    ref_logp: torch.Tensor,  # [n, L]
    estimator: str = "k3",
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens, `[n, L]`: k1 = log(pi/ref)
    (unbiased, can be negative); k3 = ref/pi - log(ref/pi) - 1 (unbiased, never negative)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"estimator must be 'k1' or 'k3', not {estimator!r}")


LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def make_ntp_loss_func(
    labels: torch.Tensor,  # [b, s]
    loss_mask: torch.Tensor,  # [b, s]
    select: Callable[[torch.Tensor], torch.Tensor],
    lam: float,
    *,
    tp_group=None,
    chunk_tokens: int = 1024,
    ce_entropy: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> LossFunc:
    """loss_func for one NTP micro-batch. `select(entropy [b, s]) -> rl_mask [b, s]` picks C
    (buckets + CAS live in the caller, which also keeps C for the rollouts). `ce_entropy`
    maps the model's output to (CE, entropy) `[b, s]` (default: the output is the logits, read
    by the fused kernel; fused_linear.py's takes the hidden states instead)."""

    def loss_func(output: torch.Tensor):  # [b, s, v/tp] logits, or what ce_entropy takes
        if ce_entropy is not None:
            token_loss, entropy = ce_entropy(output)
        else:
            token_loss, entropy = vocab_parallel_ce_entropy(
                output, labels, tp_group=tp_group, chunk_tokens=chunk_tokens, inplace_backward=True
            )
        rl_mask = select(entropy)  # [b, s] bool
        total, count = ntp_loss_sum(token_loss, loss_mask, rl_mask)
        report = {
            "ntp_loss_sum": total.detach(),
            "ntp_tokens": count,
            "rl_positions": rl_mask.sum().to(torch.int),
        }
        return lam * total, count, report

    return loss_func


def make_rl_loss_func(
    labels: torch.Tensor,  # [n, L] next token of each position (the response tokens)
    old_logp: torch.Tensor | None,  # [n, L] rollout log-probs
    adv: torch.Tensor,  # [n]
    resp_mask: torch.Tensor,  # [n, L]
    n_rl_global: int,
    *,
    aggregation: str = "token",
    clip_eps: float | None = None,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,  # [n, L], needed when kl_beta > 0
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
    tp_group=None,
    chunk_tokens: int = 1024,
) -> LossFunc:
    """loss_func for one RL micro-batch of prompt + response sequences; the loss is already
    divided by the global RL count `n_rl_global` (see the module docstring). With `tis_cap` the
    report also holds the sum of the untruncated ratios and the count of tokens capped."""
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs the reference log-probs (ref_logp)")

    def loss_func(logits: torch.Tensor):  # [n, L, v/tp]
        token_loss, _ = vocab_parallel_ce_entropy(
            logits,
            labels,
            tp_group=tp_group,
            temperature=temperature,
            chunk_tokens=chunk_tokens,
            inplace_backward=True,
        )
        logp = -token_loss  # [n, L]
        total, count = policy_loss(logp, old_logp, adv, resp_mask, aggregation, clip_eps, tis_cap)
        report = {"rl_loss_sum": total.detach(), "rl_count": count}
        if tis_cap is not None:
            ratio = torch.exp(tis_log_ratio(logp.detach(), old_logp, resp_mask).double())
            on = resp_mask > 0
            report["tis_ratio_sum"] = (ratio * on).sum()
            report["tis_capped"] = ((ratio > tis_cap) & on).sum().to(torch.int)
        if kl_beta > 0:
            # Off the responses the reference is set to the policy: zero KL there, and no
            # exp overflow of unrelated padding log-probs to multiply by the mask.
            ref = torch.where(resp_mask > 0, ref_logp, logp.detach())  # [n, L]
            kl_sum, _ = aggregate(kl_penalty(logp, ref, kl_estimator), resp_mask, aggregation)
            total = total + kl_beta * kl_sum
            report["kl_sum"] = kl_sum.detach()
        if old_logp is not None:
            gap = (logp.detach() - old_logp).abs() * (resp_mask > 0)
            report["logp_gap_sum"] = gap.sum()  # trainer vs rollout engine, per response token
            report["rl_tokens"] = rl_count(resp_mask, "token")
        return total / max(n_rl_global, 1), count, report

    return loss_func
