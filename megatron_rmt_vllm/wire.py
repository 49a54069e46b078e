"""The gloo weight transfer's wire format, shared by the trainer (sender) and the vLLM worker
(receiver); torch only.

One `/update_weights` call carries one bucket: its parameters' names, dtypes and shapes as JSON,
while the bytes travel as one flat uint8 tensor broadcast from the trainer (rank 0) over a gloo
group. Each tensor starts at a multiple of `ALIGN` bytes, so the receiver reads every one as a
view of the buffer, without a copy.
"""

import datetime

import torch
import torch.distributed as dist

ALIGN = 64


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def offsets(dtype_names: list[str], shapes: list[list[int]]) -> tuple[list[int], int]:
    """Where each tensor starts in the buffer, and the buffer's size in bytes."""
    starts, end = [], 0
    for name, shape in zip(dtype_names, shapes, strict=True):
        start = -(-end // ALIGN) * ALIGN
        size = torch.Size(shape).numel() * getattr(torch, name).itemsize
        starts.append(start)
        end = start + size
    return starts, end


def describe(names: list[str], tensors: list[torch.Tensor]) -> dict:
    """A bucket's update_info: what the worker needs to cut the buffer."""
    return {
        "names": list(names),
        "dtype_names": [dtype_name(t.dtype) for t in tensors],
        "shapes": [list(t.shape) for t in tensors],
    }


def pack(info: dict, tensors: list[torch.Tensor]) -> torch.Tensor:
    starts, total = offsets(info["dtype_names"], info["shapes"])
    buffer = torch.empty(total, dtype=torch.uint8)
    for start, tensor in zip(starts, tensors, strict=True):
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        buffer[start : start + flat.numel()].copy_(flat)
    return buffer


def unpack(info: dict, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    starts, _ = offsets(info["dtype_names"], info["shapes"])
    out = []
    for name, dtype, shape, start in zip(
        info["names"], info["dtype_names"], info["shapes"], starts, strict=True
    ):
        size = torch.Size(shape).numel() * getattr(torch, dtype).itemsize
        out.append((name, buffer[start : start + size].view(getattr(torch, dtype)).view(shape)))
    return out


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
