"""`--dry-run`: check that a configuration builds and fits before asking for GPUs.

The config is parsed and validated as for a run; the model is built at TP 1 on the meta device
(shapes only: no memory, no data, no rollout service) in a process group of one to count its parameters as the layout will
shard them; the memory model (memory.py) then prints the per-GPU peak of a step for the run's
layout. The data-parallel size is WORLD_SIZE / (TP x PP), WORLD_SIZE as torchrun sets it
(unset: one replica). The RL microbatch is taken at its worst: `rl_micro_batch_rows` (or G) rows
of a whole window of prompt plus `max_response_tokens` (`rl_layout: shared_prefix`: one row of
that prompt and G such responses).
"""

import dataclasses
import os

import torch

from megatron_rmt import memory, parallel
from megatron_rmt.config import Config, ModelConfig
from megatron_rmt.model import padded_vocab_size
from megatron_rmt.model.builder import gpt_model, transformer_config
from megatron_rmt.tokenizer import tokenizer_of

GPU_MEMORY_GIB = 80  # an H100 "80 GB" holds 80 GiB


def meta_params(m: ModelConfig, vocab_size: int) -> memory.Params:
    """Parameter counts of `m`, from the model built on the meta device at TP 1.

    Only the shapes matter, so the GPU-only features (sequence parallelism, fusions) and
    recompute are switched off for this build: none of them changes a parameter."""
    shapes = dataclasses.replace(
        m, transformer_impl="local", sequence_parallel=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, recompute_granularity=None, recompute_method=None,
        recompute_num_layers=None, bf16=False,
    )  # fmt: skip
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):  # a world of one, here
        os.environ.pop(key, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    parallel.init(1, 1)
    with torch.device("meta"):
        model = gpt_model(shapes, vocab_size, transformer_config(shapes, 1, 1))
    return memory.count_params(model)


def run(cfg: Config) -> memory.Estimate:
    """Print the predicted per-GPU peak of `cfg` and return it."""
    m, p, r = cfg.model, cfg.parallel, cfg.rmt
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", tp * pp))
    dp = max(world // (tp * pp), 1)
    vocab = m.vocab_size or padded_vocab_size(
        tokenizer_of(cfg.data).vocab_size, m.make_vocab_size_divisible_by, tp
    )
    params = meta_params(m, vocab)
    layout = memory.Layout(tp, pp, dp, p.use_distributed_optimizer)
    ntp_tokens = cfg.data.micro_batch_size * m.seq_length
    if m.rl_layout == "shared_prefix":
        work = memory.shared_prefix_workload(
            ntp_tokens, r.group_size, m.seq_length, r.max_response_tokens
        )
    else:
        rows = r.rl_micro_batch_rows or r.group_size
        work = memory.Workload(ntp_tokens, rows, m.seq_length + r.max_response_tokens)
    est = memory.predict(
        m, layout, params, work, gpu=True, kl_beta=r.kl_beta, vocab=vocab,
        ce_chunk=r.entropy_chunk_tokens, fused_linear_chunk=r.fused_linear_chunk_tokens,
    )  # fmt: skip
    total = params.per_rank(m.num_layers, 1, 1)
    print(f"dry run: {total / 1e9:.2f}B parameters; TP {tp} x PP {pp} x DP {dp}; "
          f"RL microbatch {work.rl_rows} rows x {work.rl_length} tokens")  # fmt: skip
    for name, gib in memory.table(est):
        print(f"  {name:24s} {gib:8.2f} GiB")
    verdict = "fits" if est.peak / memory.GIB < GPU_MEMORY_GIB else "does NOT fit"
    print(f"predicted per-GPU peak {est.peak / memory.GIB:.1f} GiB: {verdict} in "
          f"{GPU_MEMORY_GIB} GB")  # fmt: skip
    parallel.destroy()
    return est
