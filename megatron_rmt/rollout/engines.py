"""The rollout engine a run's `--rollout-url` asks for: a supervised fleet of vLLM servers
(fleet.py, over the validated HTTP client of client.py) with the weight sync the config names
(files, or in memory over gloo / NCCL)."""

import os

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rmt.rollout.fleet import FleetEngine
from megatron_rmt.rollout.transports import TRANSPORTS, transfer_timeout
from megatron_rmt.rollout.weight_sync import DiskWeightSync
from megatron_rmt.rollout.weight_transfer import MemoryWeightSync


def build_engine(cfg, trainable, tokenizer, vocab_size: int):
    """The engine `launch.setup` uses when `--rollout-url` is set. `vocab_size` is the served
    model's vocabulary (its config.json `vocab_size`): Megatron's padding rows are cut to it.
    The API key, if the servers want one, comes from $MEGATRON_RMT_VLLM_API_KEY (not the config,
    which is logged and checkpointed). Raises before training if a server is unreachable."""
    r = cfg.rollout
    bucket_bytes = r.weight_transfer_bucket_mb << 20
    if r.weight_transfer == "disk":
        weights = DiskWeightSync(
            trainable.model, cfg.model, vocab_size, r.weight_sync_dir, r.weight_sync_interval,
            bucket_bytes=bucket_bytes,
        )  # fmt: skip
    else:
        timeout = transfer_timeout(r.rollout_timeout)
        packed = {"bucket_bytes": bucket_bytes} if r.weight_transfer == "nccl" else {}
        transport = TRANSPORTS[r.weight_transfer](timeout, r.weight_transfer_address, **packed)
        weights = MemoryWeightSync(
            trainable.model, cfg.model, vocab_size, transport, r.weight_sync_interval,
            bucket_bytes=bucket_bytes,
        )  # fmt: skip
    engine = FleetEngine(
        r.rollout_url,
        tokenizer.eod,
        timeout=r.rollout_timeout,
        retries=r.rollout_retries,
        max_concurrency=r.rollout_max_concurrency,
        api_key=os.environ.get("MEGATRON_RMT_VLLM_API_KEY"),
        weights=weights,
        vocab_size=vocab_size,
    )
    if dist.get_rank(ps.get_model_parallel_group()) == 0:  # the ranks that will call it
        engine.check_reachable()
    return engine
