"""Disk weight sync: the trainer's weights, in Hugging Face names, written where vLLM reads them.

Every rank calls `write(version)` together: each pipeline stage gathers its parameters over TP with
`hf_mapping.megatron_to_hf_tensors` (the converter's own code path), and TP rank 0 of the first
data-parallel replica of every stage writes them as safetensors into `<sync_dir>/v<version>`: one
directory per version however many replicas. The other replicas skip the gather (it only spans
a TP group) and wait. Then `reload_from_rank0` lets global rank 0 (`is_reloader`) tell the
servers to reload that directory and shares what it learnt with every rank. Only the newest
version's directory is kept.

Deliberate choices:
- Files go to `v<version>.partial` and are renamed once every stage has written, so a server
  never reads a half-written version, and a crash leaves the previous version intact.
- Each stage writes buckets of about `bucket_bytes` (one safetensors file each): memory holds one
  bucket beside the model, whatever the model size, and vLLM reads every *.safetensors file of
  the directory.
- `due(version)` syncs every `interval` steps; version 0 (the start, or a resume) always syncs,
  so the server never samples from weights the trainer does not have.
- On GPU the same contract would be met by NCCL transfer through vLLM's weight-transfer API
  (docs/rollout.md); this file is the path that works on any host.
"""

import os
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import save_file

from megatron_rmt import platform
from megatron_rmt.config import ModelConfig
from megatron_rmt.model.hf_mapping import megatron_to_hf_tensors


class WeightSyncSchedule:
    """What every weight sync shares: this rank's model chunks, how to name and cut them for the
    servers, and when a sync is due (the first call, then every `interval` versions)."""

    def __init__(
        self,
        model: list,
        model_cfg: ModelConfig,
        vocab_rows: int,
        interval: int = 1,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 1 << 30,
    ):
        self.model = model  # this rank's model chunks (DDP-wrapped is fine)
        self.model_cfg = model_cfg
        self.vocab_rows = vocab_rows  # the served model's vocabulary: Megatron's padding is cut
        self.interval = interval
        self.dtype = dtype  # None keeps the parameters' dtype
        self.bucket_bytes = bucket_bytes
        self._first = True

    @property
    def is_reloader(self) -> bool:
        """This rank talks to the servers (global rank 0)."""
        return _rank() == 0

    def due(self, version: int) -> bool:
        first, self._first = self._first, False
        return first or version % self.interval == 0


class DiskWeightSync(WeightSyncSchedule):
    def __init__(
        self,
        model: list,
        model_cfg: ModelConfig,
        vocab_rows: int,
        sync_dir: str,
        interval: int = 1,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 1 << 30,
    ):
        super().__init__(model, model_cfg, vocab_rows, interval, dtype, bucket_bytes)
        self.sync_dir = os.path.abspath(sync_dir)

    def write(self, version: int) -> str:
        """Collective: write this version's weights; returns the directory once complete."""
        final = os.path.join(self.sync_dir, f"v{version}")
        partial = final + ".partial"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        _barrier()
        if ps.get_data_parallel_rank() == 0:  # the replicas hold the same weights
            self._write_stage(partial)
        _barrier()
        if _rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._remove_all_but(final)  # a stale server reloads from the newest version only
        return final

    def _write_stage(self, partial: str) -> None:
        """This replica's part: its stage's parameters, gathered over TP, in buckets."""
        writer = ps.get_tensor_model_parallel_rank() == 0
        stage = ps.get_pipeline_model_parallel_rank()
        bucket, size, index = {}, 0, 0
        for chunk in self.model:
            for name, tensor in megatron_to_hf_tensors(chunk, self.model_cfg, self.vocab_rows):
                if not writer:
                    continue  # still iterate: the TP gathers need every rank
                bucket[name] = tensor.detach().to(self.dtype or tensor.dtype).contiguous()
                size += bucket[name].numel() * bucket[name].element_size()
                if size >= self.bucket_bytes:
                    save_file(
                        bucket, os.path.join(partial, f"stage{stage:03d}-{index:05d}.safetensors")
                    )
                    bucket, size, index = {}, 0, index + 1
        if bucket:
            save_file(bucket, os.path.join(partial, f"stage{stage:03d}-{index:05d}.safetensors"))

    def reload_from_rank0(self, reload: Callable[[], dict]) -> dict:
        """Global rank 0 runs `reload()` (the servers load the newest version); every rank gets
        its result."""
        result = reload() if self.is_reloader else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0, device=platform.device())
            result = box[0]
        return result

    def _remove_all_but(self, keep: str) -> None:
        for entry in os.listdir(self.sync_dir):
            path = os.path.join(self.sync_dir, entry)
            if entry.startswith("v") and entry[1:].isdigit() and path != keep:
                shutil.rmtree(path, ignore_errors=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
