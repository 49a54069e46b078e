"""In-memory weight sync: the trainer's weights pushed straight into every server's model through
vLLM's weight-transfer API (`--weight-transfer gloo|nccl`); no file, no shared filesystem.

Every rank calls `push(version, urls, call)` together. Each pipeline stage gathers its parameters
over TP into HF names (`hf_mapping.megatron_to_hf_tensors`, as the disk sync does); the other
stages' TP-rank-0 send theirs to global rank 0 over the pipeline group, and the other data-parallel
replicas skip the gather. Global rank 0 then, for every server in its own thread:
`/pause?mode=wait`, `/start_weight_update` (both while the gather runs), one
`/update_weights` per bucket of about `bucket_bytes` while the bucket is broadcast
(`transports.py`), `/finish_weight_update` tagged with the version, `/resume`. Every rank learns
which version each server now holds.

Deliberate choices:
- A restarted server is found by its weight version tag (`GET /weight_info`): it no longer
  carries this trainer's tag (the same on every rank), so the transfer group is opened again
  before the push, and the fleet's probe stops using it until then (fleet.py). A server
  that fails any call is marked stale (None), its group dropped, and it is pushed again, with a
  new group, at the next sync; until then the client does not use it. Unlike the disk path there
  are no files to reload a stale server from between syncs.
- A failed pause (a hung or dead server) ends that server's sync at once: nothing else is sent
  to it, so one server costs at most two timeouts and the others proceed in parallel.
- Rank 0 holds one copy of the HF tensors during a sync (views of the parameters at TP = 1),
  plus the packed buckets on the gloo path.
"""

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rmt import platform
from megatron_rmt.config import ModelConfig
from megatron_rmt.model.hf_mapping import megatron_to_hf_tensors
from megatron_rmt.rollout.weight_sync import WeightSyncSchedule, _rank
from megatron_rmt_vllm import wire

log = logging.getLogger(__name__)


class MemoryWeightSync(WeightSyncSchedule):
    in_memory = True

    def __init__(
        self,
        model: list,
        model_cfg: ModelConfig,
        vocab_rows: int,
        transport,
        interval: int = 1,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 1 << 30,
    ):
        super().__init__(model, model_cfg, vocab_rows, interval, dtype, bucket_bytes)
        self.transport = transport
        self.tag = _same_on_every_rank(uuid.uuid4().hex[:12])  # as the servers report it
        self.held: dict[str, str | None] = {}  # url -> the tag it was last given

    def push(self, version: int, urls: list[str], call) -> dict[str, int | None]:
        """Collective: every server gets this version's weights; url -> version now held."""
        result = None
        if self.is_reloader:
            with ThreadPoolExecutor(max(1, len(urls))) as pool:
                ready = {url: pool.submit(self._prepare, url, call) for url in urls}
                tensors = self.gather()  # while the servers pause and get ready
                buckets = [
                    self.transport.pack(*b) for b in wire.buckets(tensors, self.bucket_bytes)
                ]
                del tensors
                futures = {
                    url: pool.submit(self._push_one, url, ready[url], buckets, version, call)
                    for url in urls
                }
                result = {url: f.result() for url, f in futures.items()}
        else:
            self.gather()
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0, device=platform.device())
            result = box[0]
        return result

    def tag_of(self, version: int) -> str:
        """The weight version a server reports (`/weight_info`) once it holds `version`."""
        return f"{self.tag}-v{version}"

    def gather(self) -> list[tuple[str, torch.Tensor]] | None:
        """Collective: the whole model in HF names on global rank 0 (None elsewhere)."""
        if ps.get_data_parallel_rank() != 0:
            return None  # the replicas hold the same weights
        leader = ps.get_tensor_model_parallel_rank() == 0
        local = []
        for chunk in self.model:
            for name, tensor in megatron_to_hf_tensors(chunk, self.model_cfg, self.vocab_rows):
                if leader:  # still iterate elsewhere: the TP gathers need every rank
                    local.append((name, tensor.detach().to(self.dtype or tensor.dtype)))
        if not leader:
            return None
        if ps.get_pipeline_model_parallel_world_size() > 1:
            local = _to_first_stage(local)
        return local if _rank() == 0 else None

    def _prepare(self, url: str, call) -> BaseException | None:
        """Pause the server, (re)open its transfer group if it is new or restarted, start the
        update. The error if any step failed: after a failed pause nothing else is sent."""
        try:
            call(url, "/pause?mode=wait", {})
        except OSError as e:
            return e
        try:
            if self.held.get(url) is None or held_tag(url, call) != self.held[url]:
                self.transport.connect(url, call, _workers(url, call))
            call(url, "/start_weight_update", {})
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            self._resume(url, call)
            return e
        return None

    def _push_one(self, url, ready, buckets, version: int, call) -> int | None:
        error = ready.result()
        if error is not None:
            return self._failed(url, error)
        try:
            self.transport.send_all(url, buckets, call)
            tag = self.tag_of(version)
            call(url, "/finish_weight_update", {"weight_version": tag}, **self.transport.wait)
            self.held[url] = tag
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            error = e
        error = self._resume(url, call) or error
        return version if error is None else self._failed(url, error)

    @staticmethod
    def _resume(url: str, call) -> OSError | None:
        try:
            call(url, "/resume", {})  # never leave a server paused
        except OSError as e:
            return e
        return None

    def _failed(self, url: str, error: BaseException) -> None:
        log.warning("weight push to %s failed, it is not used until the next sync: %s", url, error)
        self.held[url] = None
        self.transport.drop(url)
        return None


def _same_on_every_rank(value):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=platform.device())
        value = box[0]
    return value


def held_tag(url: str, call) -> str | None:
    return (call(url, "/weight_info", None, method="GET") or {}).get("weight_version")


def _workers(url: str, call) -> int:
    """The server's worker processes (its TP x PP), each of which joins the transfer group."""
    return len(call(url, "/collective_rpc", {"method": "check_health"})["results"])


def _to_first_stage(local: list) -> list:
    """Stage leaders (TP and DP rank 0): every stage's tensors to the first stage, in order."""
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    me, out = dist.get_rank(), []
    for src in ranks:
        meta = [[(n, t.shape, t.dtype) for n, t in local] if me == src else None]
        dist.broadcast_object_list(meta, src=src, group=group, device=platform.device())
        for i, (name, shape, dtype) in enumerate(meta[0]):
            if src == ranks[0]:
                if me == src:
                    out.append(local[i])
            elif me == src:
                dist.send(local[i][1].contiguous(), dst=ranks[0], group=group)
            elif me == ranks[0]:
                tensor = torch.empty(shape, dtype=dtype, device=platform.device())
                dist.recv(tensor, src=src, group=group)
                out.append((name, tensor))
    return out
