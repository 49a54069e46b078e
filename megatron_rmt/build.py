"""Assemble what one rank trains: its model stage wrapped in Megatron DDP, Megatron's optimizer
(distributed when DP > 1 and asked for) and Megatron's LR/WD scheduler.

One step runs two passes (NTP, then RL) into the same gradient buffers and the trainer finalises
gradients once, after both (see step.py). With `--overlap-grad-reduce` the DP reduce of each
bucket starts during the step's last backward (step.run_schedule holds it in the others).
"""

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rmt.config import Config
from megatron_rmt.model import build_model


@dataclass
class Trainable:
    model: list[DistributedDataParallel]  # one chunk per rank (no virtual pipeline stages)
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def build_trainable(cfg: Config, vocab_size: int) -> Trainable:
    module = build_model(cfg.model, vocab_size)
    tconf = module.config
    tconf.finalize_model_grads_func = None  # the trainer finalises once per step, after both passes
    distributed_opt = (
        cfg.parallel.use_distributed_optimizer and ps.get_data_parallel_world_size() > 1
    )
    ddp = DistributedDataParallel(
        config=tconf,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=distributed_opt,
        ),
        module=module,
    )
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.model.bf16,
            params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
            use_distributed_optimizer=distributed_opt,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
        ),
        [ddp],
    )
    return Trainable([ddp], optimizer, build_scheduler(cfg, optimizer))


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """constant, cosine, or WSD (OctoThinker's Stable-then-Decay: constant, then a decay phase)."""
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.train_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=o.lr_wsd_decay_iters,
        lr_wsd_decay_style="cosine" if o.lr_decay_style == "WSD" else None,
    )
