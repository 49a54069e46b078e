"""The two passes of one RMT step over Megatron's schedule (schedule.py), and the RL update that
wraps the second.

NTP pass (all microbatches of the step): on the last stage, the vocab-parallel logits give the
NTP loss and entropy of every position in one fused chunked kernel (with
`fused_linear_chunk_tokens`, the output projection is in that kernel too and the logits are
never all live: fused_linear.py); candidates are bucketed by entropy, the curriculum sampler
picks C (selection.choose), and the NTP loss is masked on C. Its loss_func returns
`(lambda * sum CE, count, report)` and the schedule runs with `calculate_per_token_loss`, so
gradients accumulate un-normalised; afterwards they are scaled by 1 / (NTP tokens over all DP).

RL update (`rl_update`, one microbatch per group of G responses in the configured layout,
rl_batch.py): loss_func returns the policy-loss sum (plus beta times the KL sum) divided by the
RL token (or sequence) count over all DP, known before the pass. With beta > 0 a forward-only
pass of the frozen reference model over the same microbatches first gives log pi_ref of every
response token on the last stage (`reference_logprobs`). Both passes write into the same DDP
gradient buffers, so L = L_RL + lambda * L_NTP, each term normalised by its own global count
(`_dp_totals`, the one place both are counted). Gradients are finalised (DP all-reduce,
tied-embedding sync) once, after both (build.Trainable.optimizer_step).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps

from megatron_rmt import losses, parallel, platform, selection
from megatron_rmt.build import Trainable
from megatron_rmt.entropy import vocab_parallel_ce_entropy
from megatron_rmt.fused_linear import linear_ce_entropy
from megatron_rmt.model.logits import forward_hidden, forward_logits
from megatron_rmt.problems import Group, Problem, problems_from_selection
from megatron_rmt.schedule import on_device, run_schedule, tp_group


@dataclass
class NTPOutcome:
    problems: list[Problem] = field(default_factory=list)
    ntp_loss_sum: float = 0.0  # un-weighted CE summed over NTP tokens (this replica)
    ntp_tokens: int = 0
    entropy_sum: float = 0.0  # over all valid positions
    entropy_count: int = 0


def ntp_pass(
    trainable: Trainable,
    microbatches: list[dict],
    selector: selection.Selector,
    ntp_weight: float,
    chunk_tokens: int,
    on_chosen: Callable[[list[Problem]], None] | None = None,
    fused_linear_chunk: int = 0,
) -> NTPOutcome:
    """Forward (and backward unless ntp_weight is 0) over the step's microbatches; returns, on
    every stage, the chosen problems and the NTP statistics (broadcast from the last stage).
    `on_chosen` sees each microbatch's problems on the last stage as soon as they are chosen.
    `fused_linear_chunk` > 0: the output projection is fused into the CE + entropy, that many
    tokens at a time (fused_linear.py), so the logits never all exist."""
    outcome = NTPOutcome()
    forward_only = ntp_weight == 0.0

    def forward_step(data_iterator, model):
        batch = on_device(next(data_iterator))
        ce_entropy = None
        if fused_linear_chunk:
            output, weight = forward_hidden(model, batch["tokens"], batch["position_ids"])
            # The loss is ntp_weight x CE summed over the loss mask less C: the kernel makes the
            # gradients of the mask in its forward and then corrects the few positions of C.
            expected = None if forward_only else batch["loss_mask"]

            def ce_entropy(hidden):  # [b, s, h] -> CE, entropy [b, s]
                return linear_ce_entropy(
                    hidden, weight, batch["labels"], tp_group=tp_group(),
                    chunk_tokens=fused_linear_chunk, expected_grad=expected,
                )  # fmt: skip
        else:
            output = forward_logits(model, batch["tokens"], batch["position_ids"])  # [b, s, v/tp]

        def select(entropy):  # [b, s] -> C as a [b, s] bool mask; keeps C for the rollouts
            chosen, levels = selection.choose(batch, entropy, selector)
            valid = batch["loss_mask"] > 0
            new = problems_from_selection(batch, chosen, entropy, levels)
            outcome.problems += new
            if on_chosen is not None:
                on_chosen(new)
            outcome.entropy_sum += float(entropy[valid].sum())
            outcome.entropy_count += int(valid.sum())
            return chosen

        return output, losses.make_ntp_loss_func(
            batch["labels"],
            batch["loss_mask"],
            select,
            ntp_weight,
            tp_group=tp_group(),
            chunk_tokens=chunk_tokens,
            ce_entropy=ce_entropy,
        )

    reports = run_schedule(
        trainable.model, forward_step, microbatches, forward_only, trainable.grad_sync
    )
    outcome.ntp_loss_sum = sum(float(r["ntp_loss_sum"]) for r in reports)
    outcome.ntp_tokens = sum(int(r["ntp_tokens"]) for r in reports)
    outcome = parallel.broadcast_object_from_last_stage(
        outcome if ps.is_pipeline_last_stage() else None
    )
    if not forward_only:
        (total,) = _dp_totals(outcome.ntp_tokens)
        for chunk in trainable.model:
            chunk.scale_gradients(1.0 / max(total, 1.0))
    return outcome


@dataclass
class RLOutcome:
    loss_sum: float = 0.0  # policy-loss sum over this replica (before the global normalisation)
    tokens: int = 0  # response tokens trained on (this replica)
    logprob_gap_sum: float = 0.0  # sum |log p_train - log p_rollout| over those tokens
    kl_sum: float = 0.0  # the KL estimate aggregated like the loss (0 without a reference)
    total_count: float = 0.0  # the RL normaliser: tokens or sequences over all replicas
    total_tokens: float = 0.0  # RL response tokens over all replicas
    computed: list = field(default_factory=list)  # compute.Computed of each trained microbatch
    reference_computed: list = field(default_factory=list)  # and of the reference's forward
    tis_ratio_sum: float = 0.0  # sum of pi_trainer / pi_sampler over the tokens (with tis_cap)
    tis_capped: int = 0  # tokens whose ratio was above tis_cap


@dataclass(frozen=True)
class RLSettings:
    """How the RL pass computes its loss (config keys of the same names, rmt section)."""

    temperature: float  # rollout_temperature: the log-probs are those of the sampler
    aggregation: str  # loss_aggregation: "token" or "sequence"
    clip_eps: float | None
    chunk_tokens: int  # entropy_chunk_tokens
    kl_beta: float = 0.0  # with a reference model
    kl_estimator: str = "k3"
    tis_cap: float | None = None  # truncated importance sampling (losses.py), off if None

    @classmethod
    def of(cls, rmt) -> "RLSettings":
        return cls(
            rmt.rollout_temperature, rmt.loss_aggregation, rmt.clip_eps,
            rmt.entropy_chunk_tokens, rmt.kl_beta, rmt.kl_estimator, rmt.tis_cap,
        )  # fmt: skip


def rl_update(
    trainable: Trainable,
    groups: list[Group],
    settings: RLSettings,
    batches: Callable[[list[Group]], list],
    reference: list | None = None,
) -> RLOutcome:
    """The GRPO backward over this replica's `groups` (each with advantages), normalised by the
    RL count over all replicas. `batches` lays the groups out as RL microbatches (rl_batch.builder
    with the run's layout); `reference`: the frozen pi_ref of the KL term."""
    microbatches = batches(groups)
    local_count = sum(
        float(losses.rl_count(mb.resp_mask, settings.aggregation)) for mb in microbatches
    )
    local_tokens = sum(float(mb.resp_mask.sum()) for mb in microbatches)
    total_count, total_tokens = _dp_totals(local_count, local_tokens)
    ref_logps = None
    if reference is None:  # no KL: a group whose advantages are all zero has no gradient
        microbatches = [mb for mb in microbatches if mb.advantages.abs().sum() > 0]
    else:
        ref_logps = reference_logprobs(
            reference, microbatches, settings.temperature, settings.chunk_tokens
        )
    outcome = rl_pass(trainable, microbatches, max(total_count, 1.0), settings, ref_logps)
    outcome.total_count, outcome.total_tokens = total_count, total_tokens
    outcome.computed = [mb.computed() for mb in microbatches]
    if reference is not None:
        outcome.reference_computed = outcome.computed
    return outcome


def _dp_totals(*local: float) -> list[float]:
    """Sums over the data-parallel replicas: the normalisers of both passes."""
    return parallel.all_reduce_sum_dp(list(local))


def reference_logprobs(
    reference: list, microbatches: list, temperature: float, chunk_tokens: int
) -> list[torch.Tensor | None]:
    """Forward-only pass of the frozen reference model over the RL microbatches: log pi_ref of
    every label at the sampling temperature, `[G, L]` per microbatch on the last stage, None on
    the others (only the last stage computes the RL loss)."""
    if not microbatches:
        return []

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(platform.device())

        def loss_func(logits):  # [G, L, v/tp]
            token_loss, _ = vocab_parallel_ce_entropy(
                logits, batch.labels, tp_group=tp_group(), temperature=temperature,
                chunk_tokens=chunk_tokens,
            )  # fmt: skip
            zero = torch.zeros((), device=logits.device)
            return zero, torch.ones((), dtype=torch.int), {"ref_logp": -token_loss}

        return batch.logits(model), loss_func

    with torch.no_grad():
        reports = run_schedule(
            reference, forward_step, microbatches, forward_only=True, shape=_rl_shape
        )
    if not ps.is_pipeline_last_stage():
        return [None] * len(microbatches)
    return [r["ref_logp"] for r in reports]


def _rl_shape(batch) -> torch.Size:
    return batch.tokens.shape


def rl_pass(
    trainable: Trainable,
    microbatches: list,
    total_count: float,
    settings: RLSettings,
    ref_logps: list | None = None,
) -> RLOutcome:
    """Backward of the GRPO policy loss over the RL microbatches (rl_batch.RowsBatch or
    SharedPrefixBatch); `total_count` is the global number of RL tokens (token aggregation) or
    sequences (sequence aggregation) that normalises it. `ref_logps`: log pi_ref `[G, L]` of
    each microbatch (reference_logprobs; None on the stages before the last)."""
    outcome = RLOutcome()
    if not microbatches:
        return outcome
    refs = ref_logps or [None] * len(microbatches)
    # Only the last stage computes the loss, so only it needs (and has) the reference log-probs.
    kl_beta = settings.kl_beta if ref_logps is not None and ps.is_pipeline_last_stage() else 0.0

    def forward_step(data_iterator, model):
        batch, ref_logp = next(data_iterator)
        batch = batch.to(platform.device())
        return batch.logits(model), losses.make_rl_loss_func(
            batch.labels,
            batch.old_logp,
            batch.advantages,
            batch.resp_mask,
            total_count,
            aggregation=settings.aggregation,
            clip_eps=settings.clip_eps,
            temperature=settings.temperature,
            ref_logp=ref_logp,
            kl_beta=kl_beta,
            kl_estimator=settings.kl_estimator,
            tis_cap=settings.tis_cap,
            tp_group=tp_group(),
            chunk_tokens=settings.chunk_tokens,
        )

    reports = run_schedule(
        trainable.model, forward_step, list(zip(microbatches, refs, strict=True)),
        forward_only=False, grad_sync=trainable.grad_sync, last_backward=True,
        shape=lambda item: _rl_shape(item[0]),
    )  # fmt: skip
    outcome.loss_sum = sum(float(r["rl_loss_sum"]) for r in reports)
    outcome.tokens = sum(int(r["rl_tokens"]) for r in reports)
    outcome.logprob_gap_sum = sum(float(r["logp_gap_sum"]) for r in reports)
    outcome.kl_sum = sum(float(r.get("kl_sum", 0.0)) for r in reports)
    outcome.tis_ratio_sum = sum(float(r.get("tis_ratio_sum", 0.0)) for r in reports)
    outcome.tis_capped = sum(int(r.get("tis_capped", 0)) for r in reports)
    return parallel.broadcast_object_from_last_stage(
        outcome if ps.is_pipeline_last_stage() else None
    )
