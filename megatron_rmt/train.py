"""Reinforcement Mid-Training on Megatron-Core. Run under torchrun:

    torchrun --nproc-per-node 2 -m megatron_rmt.train --config configs/tiny_cpu.yaml ...

Each step t of T, on streamed pretraining windows:
  1. NTP pass over the step's microbatches: fused CE + entropy per position on the last stage;
     candidates bucketed by entropy; the curriculum p(t) picks C; NTP loss on every other token.
  2. The prefixes at C become "think, then predict the next token" prompts under budget B_t;
     the rollout engine samples G responses each.
  3. Rewards (token match, length vs B_t) -> group-normalised advantages (GRPO).
  4. RL pass over prompt+response groups; its gradient joins the NTP gradient in the same buffers.
  5. One optimizer step, the LR schedule, weight sync to the rollout engine, metrics, checkpoint.
The variants (ablations, RPT, plain NTP) switch parts of this off; see variants.py. Set-up is
launch.py, the run loop and the step's tail (4-5) loop.py, the passes step.py; with
--rollout-ahead 1 the RL term of step t trains on the positions step t-1 chose (ahead.py).
"""

import os
import sys
import time

from megatron_rmt import budget as budget_mod
from megatron_rmt import compute, config, dryrun, grpo, loop, parallel, problems, selection, step
from megatron_rmt.ahead import Chosen
from megatron_rmt.launch import Run, data_for_step, init_distributed, rollout_seed, setup
from megatron_rmt.metrics import step_metrics
from megatron_rmt.rollout.contract import RolloutEngine
from megatron_rmt.rollout.dispatch import MakeRequests, StepRollouts
from megatron_rmt.save_lock import save_lock
from megatron_rmt.variants import VARIANTS, ntp_weight


def main(argv: list[str] | None = None, engine: RolloutEngine | None = None) -> None:
    """Parse, set up, train. `engine` replaces the configured rollout engine (tests, custom)."""
    cfg = config.parse(argv)
    if cfg.logging.dry_run:  # parse, build on the meta device, print predicted memory
        dryrun.run(cfg)
        return
    if not cfg.data.data_path:
        raise config.ConfigError("--data-path is required: the pretraining windows to train on")
    config.require_sampling(cfg.rmt)
    init_distributed(cfg)
    try:
        with save_lock(cfg.checkpoint.save):
            loop.run_steps(setup(cfg, engine), train_step)
    finally:
        parallel.destroy()


def train_step(run: Run, t: int) -> dict:
    """One RMT step t: returns its metrics (reduced over data-parallel ranks)."""
    cfg, r, tokenizer = run.cfg, run.cfg.rmt, run.tokenizer
    variant = VARIANTS[r.rmt_variant]
    start = time.perf_counter()
    data = data_for_step(run, t)
    microbatches = [next(data) for _ in range(cfg.num_microbatches)]
    budget, probs, selector = _schedule(run, variant, t)  # B_t, p(t) and how C is drawn

    # 1. NTP pass: per-token loss and entropy, buckets, CAS picks C, NTP loss off C.
    # 2. As each microbatch's C is chosen, its prefixes become prompts under budget B_t with G
    #    samples each; a rollout service starts sampling them while the pass goes on.
    make_requests = _request_maker(run, t, budget)
    rollouts = StepRollouts(
        run.engine, run.talker, make_requests, cfg.rollout.rollout_max_concurrency
    )
    run.trainable.zero_grads()
    ntp_start = time.perf_counter()
    weight = ntp_weight(variant, r.ntp_weight)
    ntp = step.ntp_pass(
        run.trainable, microbatches, selector, weight, r.entropy_chunk_tokens, rollouts.submit,
        fused_linear_chunk=r.fused_linear_chunk_tokens,
    )  # fmt: skip
    ntp_time = time.perf_counter() - ntp_start
    chosen = Chosen(t, ntp.problems, make_requests(ntp.problems, 0), budget, rollouts)
    # On-policy the RL term trains on these positions once sampled; one step ahead
    # (--rollout-ahead 1) on those step t-1 chose, sampled meanwhile (ahead.py).
    source = run.rollout_queue.exchange(t, chosen)

    # 3. Rewards (under the budget their prompts asked for) and group-normalised advantages.
    groups = source.groups
    scored = problems.score(
        groups, tokenizer, run.template, source.budget, r, variant.prefix_reward
    )
    adv, zero_groups = grpo.group_advantages(scored.rewards, delta=r.advantage_delta)

    # 4. RL pass into the same gradient buffers, 5. one optimizer step, weight sync.
    update = loop.finish_step(run, t, problems.with_advantages(groups, adv))
    vocab = run.trainable.model[0].module.vocab_size

    return step_metrics(
        ntp=ntp,
        rl=update.rl,
        scored=scored,
        zero_groups=zero_groups,
        ntp_time=ntp_time,
        flops_per_token=compute.train_flops_per_token(cfg.model, vocab, cfg.model.seq_length),
        budget=budget,
        probs=probs,
        grad_norm=update.grad_norm,
        lr=update.lr,
        failed=source.failed,
        invalid=source.invalid,
        dropped=source.dropped,
        rollout_latency=source.waited,  # the time the step waits for rollouts after the pass
        step_time=time.perf_counter() - start,
        window_tokens=sum(mb["tokens"].numel() for mb in microbatches),
        flops=compute.step_flops(cfg.model, vocab, microbatches, weight > 0, update.rl, groups),
        rl_time=update.rl_time,
        sync_time=update.sync_time,
        ahead=source,
    )


def _schedule(run: Run, variant, t: int):
    """Step t's token budget B_t (None without DTB), curriculum p(t) and position selector."""
    r, T = run.cfg.rmt, run.cfg.optim.train_iters
    budget = None
    if variant.budget:
        budget = budget_mod.token_budget(t, T, r.budget_initial, r.budget_min, r.budget_gamma)
    probs = selection.curriculum_probs(
        t, T, r.curriculum_start, r.curriculum_end, r.curriculum_t1, r.curriculum_t2
    )
    rpt = variant.selection == "all"
    selector = selection.Selector(
        mode=variant.selection,
        probs=probs,
        k_per_unit=r.rpt_max_positions if rpt else r.positions_per_sequence,
        thresholds=tuple(r.entropy_thresholds) if r.bucket_mode == "fixed" else None,
        eod_id=run.tokenizer.eod,
        min_context=r.min_context,
        seed=run.cfg.parallel.seed + t,
        unit=r.position_unit,
        rpt_threshold=r.rpt_entropy_threshold,
    )
    return budget, probs, selector


def _request_maker(run: Run, t: int, budget: int | None) -> MakeRequests:
    """Step t's rollout requests: prompts under B_t, G samples each, seeded by step, replica
    and problem index."""
    seed = rollout_seed(run, t)

    def make(chosen: list[problems.Problem], first: int) -> list:
        return problems.make_requests(
            chosen, run.tokenizer, run.template, budget, run.cfg.rmt, seed, first
        )

    return make


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
