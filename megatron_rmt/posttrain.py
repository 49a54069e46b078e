"""Math post-training (GRPO) of a mid-trained checkpoint on the same trainer. Run under torchrun:

    torchrun --nproc-per-node 2 -m megatron_rmt.posttrain --config configs/posttrain_tiny_cpu.yaml \
        --load CKPT --prompt-data ../shared/assets/math/math_train.jsonl ...

The paper's last stage: checkpoints from (reinforcement) mid-training continue with RL on math
problems. Each step t of T:
  1. This replica's share of the step's problems (shuffled epochs, resumable; math_data.py).
  2. Each becomes the math template's prompt (no budget); the rollout engine samples G solutions
     (a remote service gets them all at once, from the replica's talker).
  3. Reward 1 when the final \\boxed{} answer after </think> equals the gold answer
     (rewards.math_answer_reward), else 0; GRPO's group-normalised advantages.
  4. The trainer's own step tail: RL pass (with KL to a reference when --kl-beta > 0), optimizer
     step, LR schedule, weight sync (loop.finish_step); metrics and checkpoints (loop.run_steps).
Deliberate simplifications: no NTP term and no entropy selection (there is no pretraining text
here); the metrics are the trainer's, where `match_acc` is the accuracy on the step's problems
and the NTP and curriculum fields stay 0.
"""

import os
import sys
import time

from megatron_rmt import compute, config, grpo, loop, parallel, problems, prompts, rewards, step
from megatron_rmt.launch import Run, init_distributed, rollout_seed, setup
from megatron_rmt.math_data import MathProblem, ProblemStream, read_problems
from megatron_rmt.metrics import step_metrics
from megatron_rmt.rollout.contract import RolloutEngine, RolloutRequest
from megatron_rmt.rollout.dispatch import StepRollouts
from megatron_rmt.save_lock import save_lock


def main(argv: list[str] | None = None, engine: RolloutEngine | None = None) -> None:
    """Parse, set up the trainer, post-train. `engine` replaces the configured rollout engine."""
    cfg = config.parse(argv)
    if not cfg.data.prompt_data:
        raise config.ConfigError("--prompt-data is required: a JSONL of math problems")
    config.require_sampling(cfg.rmt)
    if cfg.rollout.rollout_ahead:
        raise config.ConfigError("post-training is on-policy: --rollout-ahead is for RMT training")
    math_problems = read_problems(cfg.data.prompt_data)  # a bad file fails before any work
    init_distributed(cfg)
    try:
        with save_lock(cfg.checkpoint.save):
            run = setup(cfg, engine)
            run.data = ProblemStream(
                math_problems,
                cfg.data.global_batch_size,
                run.layout.dp_rank,
                run.layout.dp_size,
                cfg.parallel.seed,
                run.progress.consumed_samples,
            )
            loop.run_steps(run, posttrain_step)
    finally:
        parallel.destroy()


def posttrain_step(run: Run, t: int) -> dict:
    """One GRPO step on this replica's problems; returns the metrics (reduced over DP)."""
    r = run.cfg.rmt
    start = time.perf_counter()
    batch: list[MathProblem] = next(run.data)
    run.trainable.zero_grads()

    # 1-2. Prompts, G samples each.
    make_requests = _request_maker(run, t)
    rollouts = StepRollouts(
        run.engine, run.talker, make_requests, run.cfg.rollout.rollout_max_concurrency
    )
    rollouts.submit(batch)
    requests = make_requests(batch, 0)
    results = rollouts.results(requests)
    rollout_latency = time.perf_counter() - start
    failed = results is None  # the service failed: nothing to learn from this step
    groups = problems.served(batch, requests, results)

    # 3. Rewards: the final boxed answer against the gold one; group advantages.
    def reward(i: int, text: str, think: int) -> rewards.RewardParts:
        return rewards.math_answer_reward(text, groups[i].problem.answer)

    scored = problems.score_responses(groups, run.tokenizer, run.template, reward)
    adv, zero_groups = grpo.group_advantages(scored.rewards, delta=r.advantage_delta)

    # 4. RL pass, one optimizer step, weight sync.
    update = loop.finish_step(run, t, problems.with_advantages(groups, adv))

    return step_metrics(
        ntp=step.NTPOutcome(),
        rl=update.rl,
        scored=scored,
        zero_groups=zero_groups,
        ntp_time=0.0,
        flops_per_token=0.0,
        budget=None,
        probs=(0.0, 0.0, 0.0),
        grad_norm=update.grad_norm,
        lr=update.lr,
        failed=failed,
        invalid=rollouts.invalid,
        dropped=rollouts.dropped,
        rollout_latency=rollout_latency,
        step_time=time.perf_counter() - start,
        window_tokens=0,
        flops=compute.step_flops(
            run.cfg.model, run.trainable.model[0].module.vocab_size, [], False, update.rl, groups
        ),
        rl_time=update.rl_time,
        sync_time=update.sync_time,
    )


def _request_maker(run: Run, t: int):
    """Step t's requests: the math prompt of each problem, G samples, seeded per replica."""
    r = run.cfg.rmt
    seed = rollout_seed(run, t)

    def make(batch: list[MathProblem], first: int) -> list[RolloutRequest]:
        ids = [prompts.encode_prompt(run.tokenizer, run.template, p.text, None) for p in batch]
        return problems.sample_requests(ids, r.max_response_tokens, r, seed, first)

    return make


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
