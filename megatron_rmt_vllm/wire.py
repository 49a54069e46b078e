"""The in-memory weight transfer's wire formats, shared by the trainer (sender) and the vLLM
worker (receiver); torch only.

One `/update_weights` call carries one bucket: its parameters' names, dtypes and shapes as JSON.
The tensors themselves travel one of two ways:
- **gloo**: broadcast from the trainer (rank 0) over a gloo group, one broadcast each, all queued
  before the first wait: no packing copy on either side (measured: packing 50 MiB into one buffer
  cost 30-90 ms here, more than the transfer).
- **shared memory** (a server on the trainer's host): the trainer copies them into a file in
  /dev/shm that both sides map; the JSON adds the file, its size and each tensor's byte offset,
  and the worker loads straight from views of its own mapping. Every tensor of a sync has its
  own place in the file: vLLM's layerwise reload keeps the tensors it is given until their layer
  is complete (some layers only at `/finish_weight_update`), so no byte may be reused within a
  sync.
"""

import datetime
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def describe(names: list[str], tensors: list[torch.Tensor]) -> dict:
    """A bucket's update_info: what the worker allocates to receive it."""
    return {
        "names": list(names),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors],
        "shapes": [list(t.shape) for t in tensors],
    }


def buckets(tensors: list, bucket_bytes: int) -> Iterator[tuple[list, list]]:
    """(names, tensors) of about `bucket_bytes` each, in order, from (name, tensor) pairs: a
    bucket closes with the tensor that fills it."""
    names, bucket, size = [], [], 0
    for name, tensor in tensors:
        names.append(name)
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield names, bucket
            names, bucket, size = [], [], 0
    if bucket:
        yield names, bucket


def send(group: dist.ProcessGroupGloo, tensors: list[torch.Tensor]) -> None:
    """Rank 0: broadcast every tensor of the bucket, all queued at once, then wait."""
    tensors = [t.contiguous() for t in tensors]
    for work in [group.broadcast(t, 0) for t in tensors]:
        work.wait()


def receive(group: dist.ProcessGroupGloo, info: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """A worker: the bucket `send` broadcasts, as (name, tensor) in order, each yielded as soon
    as it has arrived, so loading it overlaps the transfer of the next ones."""
    tensors = [
        torch.empty(shape, dtype=getattr(torch, dtype))
        for dtype, shape in zip(info["dtype_names"], info["shapes"], strict=True)
    ]
    works = [group.broadcast(t, 0) for t in tensors]
    for name, tensor, work in zip(info["names"], tensors, works, strict=True):
        work.wait()
        yield name, tensor


ALIGN = 64  # bytes: every tensor's offset in the shared file, enough for any dtype's view


def layout(tensors: list[torch.Tensor], start: int = 0) -> tuple[list[int], int]:
    """Byte offsets for `tensors` placed one after another from `start`, each aligned to
    `ALIGN`, and the end of the last one."""
    offsets, end = [], start
    for t in tensors:
        end = -(-end // ALIGN) * ALIGN
        offsets.append(end)
        end += t.numel() * t.element_size()
    return offsets, end


def shared_file(path: str, nbytes: int, create: bool = False) -> torch.Tensor:
    """The file at `path` mapped shared as `nbytes` bytes; `create`: made (or grown) to that
    size, else it must exist with at least that size (a worker never maps a file of zeros)."""
    if not create:
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size is None or size < nbytes:
            raise FileNotFoundError(
                f"no shared weight file {path} of {nbytes} bytes on this host (found: "
                f"{size}): the shm weight transfer needs the trainer on the server's host"
            )
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def place(region: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor of `dtype` and `shape` stored at `offset` of a mapped region (a view)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return region[offset : offset + nbytes].view(dtype).view(shape)


def read_shared(region: torch.Tensor, info: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """A worker: the bucket the trainer placed in the shared region, as (name, view) in order."""
    for name, dtype, shape, offset in zip(
        info["names"], info["dtype_names"], info["shapes"], info["offsets"], strict=True
    ):
        yield name, place(region, offset, getattr(torch, dtype), shape)


def open_group(
    store: dist.Store, rank: int, world_size: int, timeout_s: float
) -> dist.ProcessGroupGloo:
    """A gloo group outside torch.distributed's global state (the trainer and the server both
    have their own default group already). Blocks until all `world_size` ranks joined."""
    return dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))


def client_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(
        host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
