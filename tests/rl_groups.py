"""Test helpers: rollout requests and results as the trainer's groups and RL microbatches."""

from megatron_rmt import problems, rl_batch
from megatron_rmt.step import RLSettings


def groups(requests, results, adv):
    """Served groups of requests and results (no problems), with advantages `adv` [n, G]."""
    served = problems.served([None] * len(requests), requests, results)
    return problems.with_advantages(served, adv)


def rows(requests, results, adv, pad_id=0, rows=None, length_multiple=1):
    return rl_batch.rows_batches(groups(requests, results, adv), pad_id, rows, length_multiple)


def shared(requests, results, adv, pad_id=0, multiple=1):
    return rl_batch.shared_prefix_batches(groups(requests, results, adv), pad_id, multiple)


def settings(temperature=1.0, aggregation="token", clip_eps=None, chunk_tokens=64, **kl):
    return RLSettings(temperature, aggregation, clip_eps, chunk_tokens, **kl)
