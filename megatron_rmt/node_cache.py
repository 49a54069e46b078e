"""The dataset index cache on every node, with or without a filesystem shared with global rank 0.

Megatron-Core's GPTDataset writes its document / sample / shuffle indices on global rank 0 only;
the other ranks wait at a barrier, then read them from `path_to_cache`. A node that does not see
rank 0's directory (node-local disks, no shared filesystem) would stop with
`No such file ... document_index.npy`. `ensure_on_every_node` runs before Megatron's builder:
rank 0 leaves a marker file in the cache directory; every rank that cannot see it needs a copy of
its own, and the lowest such rank per (host, directory) builds it, in a fresh interpreter where
the process is a world of one (`python -m megatron_rmt.data`, its arguments pickled on stdin), so Megatron's builder writes the cache there exactly as it would on rank 0. Every other
rank waits for it in the closing collective, so the collective timeout bounds that build, as it
bounds rank 0's own; a build that fails stops every rank with its error.
"""

import logging
import os
import pickle
import socket
import subprocess
import sys
import uuid

import torch.distributed as dist

from megatron_rmt import parallel, platform
from megatron_rmt.config import UserError

log = logging.getLogger(__name__)


def ensure_on_every_node(build_kwargs: dict) -> None:
    """Collective. `build_kwargs`: `data.build_train_dataset`'s arguments, `cache_dir` an
    absolute path. A failure on any rank (rank 0 cannot write the directory, a node's build
    fails) stops every rank with it (`parallel.agree`)."""
    cache_dir = build_kwargs["cache_dir"]
    rank = dist.get_rank()
    nonce = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0, device=platform.device())
    marker = os.path.join(cache_dir, f".seen-by-rank0-{nonce[0]}")
    parallel.agree(lambda: rank == 0 and _leave(marker), UserError)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (os.path.exists(marker), socket.gethostname(), cache_dir))
    if rank == 0:  # every rank has looked
        os.remove(marker)
    builders: dict[tuple, int] = {}
    for r, (sees, host, path) in enumerate(views):
        if not sees:
            builders.setdefault((host, path), r)
    if rank in builders.values():
        log.warning(
            "rank %d: rank 0's dataset index cache is not visible in %s; building this node's "
            "copy", rank, cache_dir,
        )  # fmt: skip
    parallel.agree(lambda: rank in builders.values() and build_in_a_world_of_one(build_kwargs),
                   UserError)  # fmt: skip


def _leave(marker: str) -> None:
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    except OSError as e:
        raise UserError(
            f"cannot write the dataset index cache directory {os.path.dirname(marker)} "
            f"(--data-cache-path): {e}"
        ) from e


def build_in_a_world_of_one(build_kwargs: dict) -> None:
    # The child imports what this process can (the tokenizer's class, for one).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "megatron_rmt.data"],  # data.py's __main__: the build
        input=pickle.dumps(build_kwargs), capture_output=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise UserError(
            f"building the dataset index cache in {build_kwargs['cache_dir']} on "
            f"{socket.gethostname()} failed (exit code {done.returncode}):\n{tail}"
        )
