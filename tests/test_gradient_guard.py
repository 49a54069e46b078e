"""The non-finite gradient guard (build._gradients_finite): +inf, -inf and NaN anywhere, on any
rank, make every rank answer "not finite", and finite gradients (large ones too) pass, on every
rank alike. An answer that differs between ranks is what deadlocks a real step (one rank steps
into the optimizer's collectives, the other skips): here it fails the assertion at once."""

import math
from types import SimpleNamespace

import torch
import torch.distributed as dist
from distributed import spawn

from megatron_rmt import build

# (rank that holds the value, value); None: every rank's gradients finite
CASES = [
    (None, None),
    (1, math.inf),
    (0, -math.inf),
    (1, math.nan),
    (0, math.nan),
    (None, 3e38),  # finite, near fp32's largest: the float64 sum must not overflow to inf
]


def _chunk(grad: torch.Tensor, expert: torch.Tensor):
    """What the guard reads of a DDP model chunk: its gradient buffers."""
    return SimpleNamespace(
        buffers=[SimpleNamespace(grad_data=grad)],
        expert_parallel_buffers=[SimpleNamespace(grad_data=expert)],
    )


def answers_on_each_rank() -> list[bool]:
    rank, out = dist.get_rank(), []
    for holder, value in CASES:
        grads = [torch.randn(1000), torch.randn(10), torch.randn(50)]
        if value is not None and holder in (None, rank):
            grads[rank % 3].view(-1)[7] = value  # a different buffer on each rank
        model = [_chunk(grads[0], grads[1]), _chunk(grads[2], torch.zeros(0))]
        out.append(build._gradients_finite(model))
    return out


def test_every_rank_agrees_and_inf_counts_as_non_finite():
    ranks = spawn(answers_on_each_rank, 2, timeout=180)
    expected = [value is None or math.isfinite(value) for _, value in CASES]
    for (holder, value), *answers, want in zip(CASES, *ranks, expected, strict=True):
        case = f"{value} on rank {holder}" if holder is not None else f"{value} everywhere"
        assert answers == [want, want], f"{case}: ranks 0 and 1 answered {answers}, not {want}"
