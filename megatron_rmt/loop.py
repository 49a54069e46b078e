"""What every training entry point does around its own step (RMT training, post-training):
the run loop (`run_steps`: steps to T, run-long counts, metrics, checkpoints) and the step's tail
(`finish_step`: the RL pass into the gradient buffers, one optimizer step, the weight sync).
"""

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rmt import checkpoint, rl_batch, step
from megatron_rmt.async_save import AsyncSaves
from megatron_rmt.launch import Run
from megatron_rmt.metrics import MetricsWriter
from megatron_rmt.problems import Group


@dataclass(frozen=True)
class Update:
    rl: step.RLOutcome
    grad_norm: float  # NaN: the optimizer step was skipped (non-finite gradients)
    lr: float
    rl_time: float = 0.0  # seconds of the RL update (reference pass, GRPO forward + backward)
    sync_time: float = 0.0  # seconds of the weight sync to the rollout engine


def finish_step(run: Run, t: int, groups: list[Group]) -> Update:
    """The tail of step t, after its gradient buffers were zeroed (and, in RMT training, hold
    the NTP gradient): the GRPO pass over this replica's scored `groups`, one optimizer step,
    the parameters whole again, and the rollout engine at the new weights (v t+1)."""
    batches = rl_batch.builder(run.cfg, run.tokenizer.eod)
    settings = step.RLSettings.of(run.cfg.rmt)
    rl_start = time.perf_counter()
    rl = step.rl_update(run.trainable, groups, settings, batches, run.reference)
    rl_time = time.perf_counter() - rl_start
    grad_norm, lr = run.trainable.optimizer_step()
    run.trainable.gather_params()
    sync_start = time.perf_counter()
    run.engine.sync_weights(t + 1)
    return Update(rl, grad_norm, lr, rl_time, time.perf_counter() - sync_start)


# Run-long counts in the metrics: total -> the per-step metric it sums. Checkpoints keep them
# (Progress.totals), so a resumed run continues them.
TOTALS = {"rollout_failures": "rollout_failed", "flops_total": "flops"}


def run_steps(run: Run, step_fn: Callable[[Run, int], dict]) -> None:
    """`step_fn(run, t)` from where the run stands to T, with metrics and checkpoints."""
    cfg, log = run.cfg, run.cfg.logging
    is_logger = dist.get_rank() == 0
    start = run.progress.step
    writer = MetricsWriter(is_logger, log.metrics_file, log.tensorboard_dir, start_step=start)
    totals, first_reward = dict(run.progress.totals), None
    saves = AsyncSaves() if cfg.checkpoint.async_save else None
    for t in range(start, cfg.optim.train_iters):
        metrics = step_fn(run, t)
        metrics.update(getattr(run.engine, "metrics", dict)())  # fleet.FleetEngine's counts
        for total, per_step in TOTALS.items():
            totals[total] = totals.get(total, 0) + int(metrics[per_step])
            metrics[total] = totals[total]
        if first_reward is None and metrics.get("reward", 0.0) > 0:
            first_reward = t
        writer.write(t, metrics, console=t % log.log_interval == 0)
        run.progress = checkpoint.Progress(
            step=t + 1, consumed_samples=run.data.consumed_samples, totals=dict(totals)
        )
        if saves is not None:
            saves.poll()
        if cfg.checkpoint.save and _should_save(cfg, t + 1):
            progress = run.progress
            if run.rollout_queue is not None:  # one step ahead: the positions not yet trained
                pending = run.rollout_queue.checkpoint_state()
                progress = dataclasses.replace(progress, pending_rollouts=pending)
            path = checkpoint.save(cfg.checkpoint.save, run.trainable, progress, cfg, saves)
            if is_logger:
                print(f"{'saving' if saves else 'saved'} checkpoint {path}", flush=True)
    if saves is not None:
        saves.finish()  # the run's last save is published before it ends
    writer.close()
    untrained = run.rollout_queue.drain() if run.rollout_queue is not None else 0
    if is_logger and untrained:
        kept = "kept in the last checkpoint" if cfg.checkpoint.save else "dropped"
        print(f"{untrained} positions of the last step sampled, not trained ({kept})", flush=True)
    if is_logger:
        reward = "never above 0" if first_reward is None else f"> 0 first at step {first_reward}"
        print(
            f"done: {cfg.optim.train_iters} steps; reward {reward} (this process); "
            f"metrics in {log.metrics_file}",
            flush=True,
        )


def _should_save(cfg, steps_done: int) -> bool:
    interval = cfg.checkpoint.save_interval
    return steps_done == cfg.optim.train_iters or bool(interval and steps_done % interval == 0)
