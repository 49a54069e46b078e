"""Process groups: torch.distributed (nccl on GPU, gloo on CPU), Megatron's TP/PP/DP groups, seeds,
and the few collectives the rest of the trainer needs.

Everything distributed starts here and nowhere else. Ranks are laid out the Megatron way
(TP innermost, then DP, then PP), so every rank of one data-parallel replica shares a DP rank.
"""

import datetime
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_rmt import platform

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its TP/PP/DP coordinates and sizes."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 10) -> Layout:
    """Initialise torch.distributed from the torchrun environment and Megatron's parallel groups.

    A plain single process (no RANK/WORLD_SIZE in the environment) becomes a world of one.
    `timeout_minutes` bounds every collective, those of Megatron's subgroups included: ranks wait
    in them while a rollout service samples or reloads weights.
    """
    platform.activate()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if platform.cuda_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_minutes,
        )
    layout = layout_of_this_rank()
    seed_everything(seed, layout)
    return layout


def layout_of_this_rank() -> Layout:
    return Layout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def mix_seed(seed: int, index: int) -> int:
    """One seed per (seed, index) pair: the selection draw of a microbatch, the sampling of a
    step's i-th rollout request."""
    return seed * 1_000_003 + index


def seed_everything(seed: int, layout: Layout) -> None:
    """Seed Python, NumPy and torch, offset per pipeline stage (as Megatron-LM does), and the
    tensor-parallel RNG tracker (one stream shared by the replica, one per TP rank)."""
    stage_seed = seed + 100 * layout.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    """Tear down Megatron's groups and the process group (tests call this between runs)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object_from_last_stage(obj):
    """Send a picklable object from the last pipeline stage to every stage of this pipeline.

    Used for what only the last stage knows (selected positions, losses); other stages pass None.
    """
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size() - 1)
    return _broadcast_object(obj, src, group)


def broadcast_object_in_replica(obj, src: int):
    """Send a picklable object from global rank `src` to the rest of its model-parallel replica
    (TP x PP). The rollout results are fetched by one rank per replica and shared this way."""
    return _broadcast_object(obj, src, ps.get_model_parallel_group())


def replica_talker() -> int:
    """Collective over the replica: the global rank of its last-stage, TP-rank-0 process, which
    chooses C and so talks to a rollout service."""
    group = ps.get_model_parallel_group()
    me = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, (me, dist.get_rank()), group=group)
    return next(rank for is_talker, rank in flags if is_talker)


def _broadcast_object(obj, src: int, group):
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=platform.device())
    return box[0]


def all_reduce_sum_dp(values: list[float]) -> list[float]:
    """Sum a few scalars over the data-parallel group (token counts, metric sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=platform.device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def agree(check: Callable[[], T], error: type[Exception]) -> T:
    """`check()` on every rank (each on its own node's files, or only one rank acting); its
    value. When it raises `error` on any rank, every rank raises `error` naming the ranks and
    hosts it failed on, instead of the others going on into a collective that waits for the
    failed rank until its timeout. Collective when torch.distributed is initialised (it also
    serves as a barrier)."""
    value, caught = None, None
    try:
        value = check()
    except error as e:
        caught = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if caught is not None:
            raise caught
        return value
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), None if caught is None else str(caught)))
    failed = [
        f"rank {r} on {host}: {message}" for r, (host, message) in enumerate(views) if message
    ]
    if failed:
        more = f" (and {len(failed) - 3} more ranks)" if len(failed) > 3 else ""
        raise error("; ".join(failed[:3]) + more) from caught
    return value


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
