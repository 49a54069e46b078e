"""What one rank trains and the operations on it: its model stage wrapped in Megatron DDP,
Megatron's optimizer (distributed when DP > 1 and asked for), Megatron's LR/WD scheduler, and
the step's gradient bookkeeping (zero, finalise + step, gather the parameters).

One step runs two passes (NTP, then RL) into the same gradient buffers and the trainer finalises
gradients once, after both (`Trainable.optimizer_step`). With `--overlap-grad-reduce` the DP
reduce of each bucket starts during the step's last backward (schedule.GradSync holds it in the
others).
"""

import math
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rmt import platform
from megatron_rmt.config import Config
from megatron_rmt.model import build_model
from megatron_rmt.schedule import GradSync


@dataclass
class Trainable:
    model: list[DistributedDataParallel]  # one chunk per rank (no virtual pipeline stages)
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    grad_sync: GradSync = field(init=False)
    params_partial: bool = field(init=False, default=False)  # a param gather is pending

    def __post_init__(self):
        self.grad_sync = GradSync(self.model[0])

    def zero_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.grad_sync.started = False
        self.optimizer.zero_grad()

    def optimizer_step(self) -> tuple[float, float]:
        """Finalise gradients once (DP reduce, embedding sync), step, advance the LR schedule.
        Returns (grad norm, learning rate used).

        A NaN or inf in any rank's gradients skips the update: the gradients are zeroed, the LR
        schedule does not advance (as Megatron-LM does when its optimizer reports an overflow,
        which is honoured the same way) and the norm returned is NaN, which the metrics count as
        `skipped_step`. Megatron checks for overflow only with a loss scaler (fp16), so fp32 and
        bf16 training would otherwise step into NaN weights."""
        if self.grad_sync.overlapped and not self.grad_sync.started:
            for chunk in self.model:  # no backward of this step started the overlapped reduce
                chunk.start_grad_sync()
        finalize_model_grads(self.model, num_tokens=None)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if _gradients_finite(self.model):
            updated, grad_norm, _ = self.optimizer.step()
            if updated:
                self.params_partial = any(c.ddp_config.overlap_param_gather for c in self.model)
                self.scheduler.step(increment=1)
                return float(grad_norm or 0.0), lr
        self.zero_grads()
        return math.nan, lr

    def gather_params(self) -> None:
        """Make every rank's parameters whole again after an optimizer step. With
        `--overlap-param-gather` the distributed optimizer updates only this rank's shard and
        the all-gather of the rest is left to the next forward's pre-hooks; whatever reads the
        parameters outside a forward (the weight sync to the rollout service, a checkpoint
        save) calls this first. It completes the gather synchronously; without the overlap,
        nothing to do, as after an earlier call since the last step."""
        if not self.params_partial:
            return
        for chunk in self.model:
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)
        self.params_partial = False


def _gradients_finite(model: list) -> bool:
    """Collective over all ranks: whether every rank's gradient buffers are finite. Checked on
    their sums (no buffer-sized temporary), in which any NaN or inf survives."""
    total = torch.zeros((), dtype=torch.float64, device=platform.device())
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            total += buffer.grad_data.sum(dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return bool(torch.isfinite(total))


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
