"""The two passes of one RMT step over Megatron's `forward_backward_func`, and the optimizer step.

NTP pass (all microbatches of the step): on the last stage, the vocab-parallel logits give the
NTP loss and entropy of every position in one fused chunked kernel (with
`fused_linear_chunk_tokens`, the output projection is in that kernel too and the logits are
never all live: fused_linear.py); candidates are bucketed by
entropy, the curriculum sampler picks C, and the NTP loss is masked on C. Its loss_func returns
`(lambda * sum CE, count, report)` and the schedule runs with `calculate_per_token_loss`, so
gradients accumulate un-normalised; afterwards they are scaled by 1 / (NTP tokens over all DP).

RL pass (one microbatch per group of G responses: G rows of prompt + response, or with
`rl_layout: shared_prefix` one row holding the prompt once, see model/shared_prefix.py):
loss_func returns the policy-loss sum (plus beta times the KL sum) divided by the RL token (or
sequence) count over all DP, known before the pass. With beta > 0 a forward-only pass of the
frozen reference model over the same microbatches first gives log pi_ref of every response token
on the last stage (`reference_logprobs`). Both passes write into the same DDP gradient buffers, so L = L_RL + lambda * L_NTP, each term normalised by its own
global count. Gradients are finalised (DP all-reduce, tied-embedding sync) once, after both.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_rmt import losses, parallel, platform, selection
from megatron_rmt.build import Trainable
from megatron_rmt.entropy import vocab_parallel_ce_entropy
from megatron_rmt.fused_linear import linear_ce_entropy
from megatron_rmt.model.logits import forward_hidden, forward_logits
from megatron_rmt.model.shared_prefix import block_mask, rope_at
from megatron_rmt.problems import Problem, problems_from_selection


@dataclass(frozen=True)
class Selector:
    """How the NTP pass picks RL positions this step (None mode: plain NTP, nothing picked)."""

    mode: str | None  # "curriculum", "uniform", "all" (RPT) or None
    probs: tuple[float, float, float]
    k_per_unit: int  # positions per unit; for "all", the cap per unit (0: every kept position)
    thresholds: tuple[float, float, float] | None  # None: per-microbatch quantiles
    eod_id: int
    min_context: int
    seed: int
    unit: str = "window"  # "document" or "window" (selection.unit_ids)
    rpt_threshold: float = 0.5  # "all": RPT's entropy filter, nats


@dataclass
class NTPOutcome:
    problems: list[Problem] = field(default_factory=list)
    ntp_loss_sum: float = 0.0  # un-weighted CE summed over NTP tokens (this replica)
    ntp_tokens: int = 0
    entropy_sum: float = 0.0  # over all valid positions
    entropy_count: int = 0


def _tp_group():
    return (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )


def _on_device(batch: dict) -> dict:
    """The data pipeline yields CPU tensors; the model wants them where it lives."""
    return {k: v.to(platform.device(), non_blocking=True) for k, v in batch.items()}


def run_schedule(
    model: list, forward_step, microbatches: list[dict], forward_only: bool,
    sync_grads: bool = False,
) -> list:  # fmt: skip
    """Megatron's schedule over the microbatches; the loss_func reports (last stage only).

    Microbatches may differ in shape (RL rows padded to their own length): with pipeline stages,
    whose point-to-point transfers have one fixed shape, each run of equal shapes gets its own
    schedule. `sync_grads`: the last backward of the step, whose last microbatch may start the
    overlapped DP gradient reduce (`--overlap-grad-reduce`); every other backward holds it."""
    runs = [microbatches]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        runs = _equal_shape_runs(microbatches)
    reports = []
    for i, run in enumerate(runs):
        b, s = run[0]["tokens"].shape
        with _grad_sync(model, sync_grads and i == len(runs) - 1):
            reports += get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(run),
                model=model,
                num_microbatches=len(run),
                seq_length=s,
                micro_batch_size=b,
                forward_only=forward_only,
            )
    return reports


def _equal_shape_runs(microbatches: list[dict]) -> list[list[dict]]:
    runs = []
    for mb in microbatches:
        if runs and runs[-1][0]["tokens"].shape == mb["tokens"].shape:
            runs[-1].append(mb)
        else:
            runs.append([mb])
    return runs


@contextlib.contextmanager
def _grad_sync(model: list, last: bool):
    """With an overlapped gradient reduce, Megatron's DDP starts a bucket's reduce as soon as its
    grads are final in a schedule's last microbatch. A step has several backward passes into the
    same buffers, so only the step's last one may do that (through the schedule's no_sync_func);
    the others run wholly inside `no_sync`. Without overlap nothing changes."""
    ddp = model[0]
    if not getattr(getattr(ddp, "ddp_config", None), "overlap_grad_reduce", False):
        yield
        return
    config = ddp.config
    if last:
        config.no_sync_func = ddp.no_sync
        ddp.grad_sync_started = True
        yield
        return
    config.no_sync_func = None
    with ddp.no_sync():
        yield


def ntp_pass(
    trainable: Trainable,
    microbatches: list[dict],
    selector: Selector,
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
        batch = _on_device(next(data_iterator))
        ce_entropy = None
        if fused_linear_chunk:
            output, weight = forward_hidden(model, batch["tokens"], batch["position_ids"])
            # The loss is ntp_weight x CE summed over the loss mask less C: the kernel makes the
            # gradients of the mask in its forward and then corrects the few positions of C.
            expected = None if forward_only else batch["loss_mask"]

            def ce_entropy(hidden):  # [b, s, h] -> CE, entropy [b, s]
                return linear_ce_entropy(
                    hidden, weight, batch["labels"], tp_group=_tp_group(),
                    chunk_tokens=fused_linear_chunk, expected_grad=expected,
                )  # fmt: skip
        else:
            output = forward_logits(model, batch["tokens"], batch["position_ids"])  # [b, s, v/tp]

        def select(entropy):  # [b, s] -> C as a [b, s] bool mask; keeps C for the rollouts
            chosen, levels = _choose(batch, entropy, selector)
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
            tp_group=_tp_group(),
            chunk_tokens=chunk_tokens,
            ce_entropy=ce_entropy,
        )

    reports = run_schedule(trainable.model, forward_step, microbatches, forward_only)
    outcome.ntp_loss_sum = sum(float(r["ntp_loss_sum"]) for r in reports)
    outcome.ntp_tokens = sum(int(r["ntp_tokens"]) for r in reports)
    outcome = parallel.broadcast_object_from_last_stage(
        outcome if ps.is_pipeline_last_stage() else None
    )
    if not forward_only:
        total = parallel.all_reduce_sum_dp([outcome.ntp_tokens])[0]
        for chunk in trainable.model:
            chunk.scale_gradients(1.0 / max(total, 1.0))
    return outcome


def _choose(batch: dict, entropy: torch.Tensor, sel: Selector):
    """C as a [b, s] bool mask and the difficulty level of every position."""
    if sel.mode is None:
        none = torch.zeros_like(entropy, dtype=torch.bool)
        return none, torch.full_like(entropy, selection.NOT_CANDIDATE, dtype=torch.long)
    cand = selection.candidate_mask(
        batch["context_len"],
        batch["loss_mask"],
        batch["tokens"],
        batch["labels"],
        eod_id=sel.eod_id,
        min_context=sel.min_context,
    )
    thresholds = sel.thresholds or selection.quantile_thresholds(entropy, cand)
    levels = selection.difficulty_levels(entropy, cand, thresholds)
    # Seeded by the samples themselves: every TP rank (and a resumed run) draws the same C.
    gen = torch.Generator().manual_seed(sel.seed * 1_000_003 + int(batch["sample_ids"][0]))
    units = selection.unit_ids(batch["context_len"], sel.unit)
    if sel.mode == "all":  # RPT: levels are only reported (NOT_CANDIDATE below tau_easy)
        chosen = selection.rpt_positions(
            entropy, cand, sel.rpt_threshold, sel.k_per_unit, gen, units
        )
    else:
        chosen = selection.select_positions(levels, sel.mode, sel.probs, sel.k_per_unit, gen, units)
    return chosen, levels


@dataclass
class RLOutcome:
    loss_sum: float = 0.0  # policy-loss sum over this replica (before the global normalisation)
    tokens: int = 0  # response tokens trained on (this replica)
    logprob_gap_sum: float = 0.0  # sum |log p_train - log p_rollout| over those tokens
    kl_sum: float = 0.0  # the KL estimate aggregated like the loss (0 without a reference)


@dataclass(frozen=True)
class KL:
    """GRPO's KL term: beta and the estimator (k1 or k3) of KL(pi || pi_ref)."""

    beta: float
    estimator: str


def position_ids(tokens: torch.Tensor) -> torch.Tensor:  # [g, s] -> [g, s]
    """0..s-1 on every row: each sequence starts at position 0."""
    g, s = tokens.shape
    return torch.arange(s, device=tokens.device).expand(g, s)


def rl_logits(model, batch: dict) -> torch.Tensor:
    """The RL pass's forward of one microbatch: on the last stage the logits `[G, L, v/tp]`
    that predict `batch["labels"]`, else the hidden states. Rows layout: every position of
    every row. Shared-prefix layout (a batch with "segments", see problems.py): the group's row
    under its block mask and RoPE positions, with logits only where a response label is."""
    tokens = batch["tokens"]
    if "segments" not in batch:
        return forward_logits(model, tokens, position_ids(tokens))
    mask = block_mask(batch["segments"])
    with rope_at(model, batch["position_ids"]):
        out = forward_logits(model, tokens, batch["position_ids"], mask, rows=batch["rows"])
    if not unwrap_model(model).post_process:
        return out
    return out.reshape(*batch["labels"].shape, out.shape[-1])  # [1, G * L, v] -> [G, L, v]


def reference_logprobs(
    reference: list, microbatches: list[dict], temperature: float, chunk_tokens: int
) -> list[torch.Tensor | None]:
    """Forward-only pass of the frozen reference model over the RL microbatches: log pi_ref of
    every label at the sampling temperature, `[G, L]` per microbatch on the last stage, None on
    the others (only the last stage computes the RL loss)."""
    if not microbatches:
        return []

    def forward_step(data_iterator, model):
        batch = _on_device(next(data_iterator))
        labels = batch["labels"]

        def loss_func(logits):  # [G, L, v/tp]
            token_loss, _ = vocab_parallel_ce_entropy(
                logits, labels, tp_group=_tp_group(), temperature=temperature,
                chunk_tokens=chunk_tokens,
            )  # fmt: skip
            zero = torch.zeros((), device=logits.device)
            return zero, torch.ones((), dtype=torch.int), {"ref_logp": -token_loss}

        return rl_logits(model, batch), loss_func

    with torch.no_grad():
        reports = run_schedule(reference, forward_step, microbatches, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return [None] * len(microbatches)
    return [r["ref_logp"] for r in reports]


def rl_pass(
    trainable: Trainable,
    microbatches: list[dict],
    total_count: float,
    temperature: float,
    aggregation: str,
    clip_eps: float | None,
    chunk_tokens: int,
    kl: KL | None = None,
) -> RLOutcome:
    """Backward of the GRPO policy loss over the groups; `total_count` is the global number of
    RL tokens (token aggregation) or sequences (sequence aggregation) that normalises it. With
    `kl`, each microbatch carries "ref_logp" `[G, L]` on the last stage."""
    outcome = RLOutcome()
    if not microbatches:
        return outcome
    # Only the last stage computes the loss, so only it needs (and has) the reference log-probs.
    kl_beta = kl.beta if kl is not None and ps.is_pipeline_last_stage() else 0.0

    def forward_step(data_iterator, model):
        batch = _on_device(next(data_iterator))
        return rl_logits(model, batch), losses.make_rl_loss_func(
            batch["labels"],
            batch["old_logp"],
            batch["advantages"],
            batch["resp_mask"],
            total_count,
            aggregation=aggregation,
            clip_eps=clip_eps,
            temperature=temperature,
            ref_logp=batch.get("ref_logp"),
            kl_beta=kl_beta,
            kl_estimator=kl.estimator if kl is not None else "k3",
            tp_group=_tp_group(),
            chunk_tokens=chunk_tokens,
        )

    reports = run_schedule(
        trainable.model, forward_step, microbatches, forward_only=False, sync_grads=True
    )
    outcome.loss_sum = sum(float(r["rl_loss_sum"]) for r in reports)
    outcome.tokens = sum(int(r["rl_tokens"]) for r in reports)
    outcome.logprob_gap_sum = sum(float(r["logp_gap_sum"]) for r in reports)
    outcome.kl_sum = sum(float(r.get("kl_sum", 0.0)) for r in reports)
    return parallel.broadcast_object_from_last_stage(
        outcome if ps.is_pipeline_last_stage() else None
    )


def zero_grads(trainable: Trainable) -> None:
    for chunk in trainable.model:
        chunk.zero_grad_buffer()
        chunk.grad_sync_started = False
    trainable.optimizer.zero_grad()


def gather_params(trainable: Trainable) -> None:
    """Make every rank's parameters whole again after an optimizer step. With
    `--overlap-param-gather` the distributed optimizer updates only this rank's shard and the
    all-gather of the rest is left to the next forward's pre-hooks; whatever reads the
    parameters outside a forward (the weight sync to the rollout service, a checkpoint save)
    calls this first. It completes the gather synchronously; without the overlap, nothing to do."""
    for chunk in trainable.model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def optimizer_step(trainable: Trainable) -> tuple[float, float]:
    """Finalise gradients once (DP reduce, embedding sync), step, advance the LR schedule.
    Returns (grad norm, learning rate used).

    A NaN or inf in any rank's gradients skips the update: the gradients are zeroed, the LR
    schedule does not advance (as Megatron-LM does when its optimizer reports an overflow, which
    is honoured the same way) and the norm returned is NaN, which the metrics count as
    `skipped_step`. Megatron checks for overflow only with a loss scaler (fp16), so fp32 and
    bf16 training would otherwise step into NaN weights."""
    for chunk in trainable.model:  # overlapped reduce, but no RL backward started it this step
        if chunk.ddp_config.overlap_grad_reduce and not getattr(chunk, "grad_sync_started", 0):
            chunk.start_grad_sync()
    finalize_model_grads(trainable.model, num_tokens=None)
    lr = float(trainable.optimizer.param_groups[0]["lr"])
    if _gradients_finite(trainable.model):
        updated, grad_norm, _ = trainable.optimizer.step()
        if updated:
            trainable.scheduler.step(increment=1)
            return float(grad_norm or 0.0), lr
    zero_grads(trainable)
    return math.nan, lr


def _gradients_finite(model: list) -> bool:
    """Collective over all ranks: whether every rank's gradient buffers are finite. Checked on
    their sums (no buffer-sized temporary), in which any NaN or inf survives."""
    total = torch.zeros((), dtype=torch.float64, device=platform.device())
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            total += buffer.grad_data.sum(dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return bool(torch.isfinite(total))
