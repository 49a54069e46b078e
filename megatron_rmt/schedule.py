"""Megatron's pipeline schedule, as every pass of this project calls it (the NTP and RL passes of a
step, the reference model's forward, evaluation and the cold start).

- Microbatches may differ in shape (RL rows padded to their own length). With pipeline stages,
  whose point-to-point transfers have one fixed shape, each run of equal shapes gets its own
  schedule call.
- A step has several backward passes into the same DDP gradient buffers. With
  `--overlap-grad-reduce` Megatron's DDP starts a bucket's DP reduce as soon as that bucket's
  grads are final in a schedule's last microbatch, so only the step's last backward may do that;
  the others run wholly with the sync held. `GradSync` is that state, this project's own: the
  schedule reads its `no_sync` (installed once as the model config's `no_sync_func`, the hook
  Megatron's schedules call around all but the last microbatch), and the optimizer step reads
  `started` to know whether a backward already started the reduce.
"""

import contextlib
from collections.abc import Callable

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rmt import platform


class GradSync:
    """Whether this step's backward passes may start the overlapped DP gradient reduce."""

    def __init__(self, ddp):
        self.ddp = ddp
        self.overlapped = bool(getattr(ddp.ddp_config, "overlap_grad_reduce", False))
        self.started = False  # a backward of this step started the reduce
        self._holding = False  # inside a backward that must not start it
        if self.overlapped:
            ddp.config.no_sync_func = self.no_sync

    @contextlib.contextmanager
    def no_sync(self):
        """The schedule's hook around all but a run's last microbatch: DDP's own no_sync, or
        nothing while the whole run is held anyway (a nested no_sync would end the hold)."""
        if self._holding:
            yield
            return
        with self.ddp.no_sync():
            yield

    @contextlib.contextmanager
    def backward(self, last: bool):
        """Around one schedule call: the step's last backward may start the reduce."""
        if not self.overlapped:
            yield
            return
        if last:
            self.started = True
            yield
            return
        self._holding = True
        try:
            with self.ddp.no_sync():
                yield
        finally:
            self._holding = False


def tokens_shape(microbatch: dict) -> torch.Size:
    return microbatch["tokens"].shape


def run_schedule(
    model: list, forward_step, microbatches: list, forward_only: bool,
    grad_sync: GradSync | None = None, last_backward: bool = False,
    shape: Callable[[object], torch.Size] = tokens_shape,
) -> list:  # fmt: skip
    """Megatron's schedule over the microbatches; returns the loss_func reports (last stage
    only). `shape(mb)` is a microbatch's `[b, s]`; `grad_sync` with `last_backward`: this is
    the step's last backward (see GradSync)."""
    runs = [microbatches]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        runs = _equal_shape_runs(microbatches, shape)
    reports = []
    for i, run in enumerate(runs):
        b, s = shape(run[0])
        hold = contextlib.nullcontext()
        if grad_sync is not None and not forward_only:
            hold = grad_sync.backward(last_backward and i == len(runs) - 1)
        with hold:
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


def _equal_shape_runs(microbatches: list, shape) -> list[list]:
    runs = []
    for mb in microbatches:
        if runs and shape(runs[-1][0]) == shape(mb):
            runs[-1].append(mb)
        else:
            runs.append([mb])
    return runs


def tp_group():
    """The tensor-parallel group for the vocab-parallel kernels (None at TP 1)."""
    return (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )


def on_device(batch: dict) -> dict:
    """The data pipeline yields CPU tensors; the model wants them where it lives."""
    return {k: v.to(platform.device(), non_blocking=True) for k, v in batch.items()}


def position_ids(tokens: torch.Tensor) -> torch.Tensor:  # [g, s] -> [g, s]
    """0..s-1 on every row: each sequence starts at position 0."""
    g, s = tokens.shape
    return torch.arange(s, device=tokens.device).expand(g, s)
