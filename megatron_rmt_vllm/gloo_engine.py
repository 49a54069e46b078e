"""The `gloo` weight-transfer backend inside a vLLM worker (CPU or GPU); it also takes the
shared-memory hand-off of a trainer on the same host (`--weight-transfer shm` on the trainer's
side, wire.py), which needs no group.

The trainer opens a TCP store and a gloo group with rank 0 (itself) and ranks `rank_offset + i`
for the server's workers, then drives the routes: `/start_weight_update` begins vLLM's layerwise
reload (as the `nccl` backend does), each `/update_weights` receives one bucket (`wire.py`) and
loads it with the model's own `load_weights`, `/finish_weight_update` finalises the reload (the
CPU backend re-packs its GEMM weights there). The weights land exactly as `reload_weights` from
files would load them.
"""

from dataclasses import dataclass

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from megatron_rmt_vllm import wire


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    shm_path: str | None = None  # set: the tensors are in this shared file, not on the group
    shm_bytes: int = 0
    offsets: list[int] | None = None


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.region = None  # ((path, bytes), the mapped shared file) of the last shm update

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """(Re)join the trainer: a trainer that restarted, or reconnects after a failure, gets a
        fresh group."""
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        store = wire.client_store(
            init_info.master_address, init_info.master_port, init_info.world_size,
            init_info.timeout_s,
        )  # fmt: skip
        self.group = wire.open_group(store, rank, init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class also synchronises the accelerator, which a CPU server does not have;
        # load_weights copies from host memory synchronously anyway.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        info = vars(update_info)
        if update_info.shm_path:
            tensors = wire.read_shared(
                self._mapped(update_info.shm_path, update_info.shm_bytes), info
            )
        elif self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init first")
        else:
            tensors = wire.receive(self.group, info)
        self.model.load_weights(tensors)

    def _mapped(self, path: str, nbytes: int):
        """The trainer's shared file, mapped once: it stays mapped after the trainer unlinks it,
        and a new file (a new trainer, a bigger model) replaces the mapping."""
        if self.region is None or self.region[0] != (path, nbytes):
            self.region = ((path, nbytes), wire.shared_file(path, nbytes))
        return self.region[1]

    def shutdown(self) -> None:
        self.group = None
        self.region = None
