"""`--overlap-param-gather` over DP 2 with the distributed optimizer: the same steps as without,
and whatever reads the parameters right after a step (the rollout weight sync) sees them whole."""

import rl_groups
import torch
from distributed import spawn
from test_scale_features import _cfg, _fresh, _groups, _ntp_batch

from megatron_rmt import parallel, step
from megatron_rmt.selection import Selector


def _params(trainable):
    return torch.cat([p.detach().flatten() for p in trainable.model[0].module.parameters()])


def steps_with_param_gather(overlap):
    """Three NTP + RL steps as train_step runs them; returns the NTP losses, the parameters the
    weight sync read after each step, and the parameters after the next forward."""
    cfg = _cfg(1, parallel_kw={"overlap_param_gather": overlap})
    trainable = _fresh(cfg)
    assert trainable.model[0].ddp_config.use_distributed_optimizer
    rank = parallel.layout_of_this_rank().dp_rank
    selector = Selector(None, (1.0, 0.0, 0.0), 1, (0.5, 1.0, 1.5), 0, 1, 0)
    losses, synced = [], []
    for t in range(3):
        trainable.zero_grads()
        ntp = step.ntp_pass(trainable, [_ntp_batch(2 * t + rank)], selector, 0.1, 64)
        losses.append(ntp.ntp_loss_sum)
        rl = rl_groups.rows(*_groups(t + 10 * rank), pad_id=0)
        step.rl_pass(trainable, rl, 40.0, rl_groups.settings())
        trainable.optimizer_step()
        trainable.gather_params()
        synced.append(_params(trainable))  # what the weight sync to the rollout service reads
    return torch.tensor(losses), torch.stack(synced)


def both_gathers():
    return steps_with_param_gather(False), steps_with_param_gather(True)


def test_overlapped_param_gather_gives_the_same_steps_and_synced_weights():
    for (plain_loss, plain_params), (loss, params) in spawn(both_gathers, 2):
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(params, plain_params, rtol=1e-6, atol=0)
