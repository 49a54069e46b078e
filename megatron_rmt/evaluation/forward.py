"""Forward-only passes for evaluation: per-position entropy, NTP loss and greedy prediction.

The model is this rank's pipeline stage; microbatches go through Megatron's forward-only
pipeline schedule, so the same code runs at any TP/PP. On the last stage the vocab-parallel
logits give, at the positions a microbatch asks about, the entropy and cross-entropy (the
trainer's fused kernel, over the padded vocabulary exactly as in training, so difficulty means
the same as in the trainer) and the greedy next token (`vocab_parallel_argmax`); the results
are broadcast to every stage.

Deliberate choices:
- The greedy prediction is taken over the real vocabulary only: Megatron's padding rows are no
  tokens (the embedded engine never samples them either). Ties go to the lowest token id, as
  `torch.argmax` breaks them.
- Argmax reads only the asked-for rows (`logits[mask]`, one row per evaluated position); the
  entropy kernel reads the logits in place, chunked, so no full-vocabulary copy is made.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_rmt import checkpoint, parallel, platform
from megatron_rmt.config import ModelConfig
from megatron_rmt.entropy import vocab_parallel_ce_entropy
from megatron_rmt.launch import model_vocab
from megatron_rmt.model import build_model, frozen
from megatron_rmt.model.logits import forward_logits
from megatron_rmt.schedule import position_ids, run_schedule
from megatron_rmt.tokenizer import tokenizer_of


def build_eval_model(model_cfg: ModelConfig, vocab_size: int, load: str | None) -> list:
    """This rank's stage, frozen, in eval mode, as a one-chunk list: the latest checkpoint under
    `load`, or without one the random initialisation the parallel seed gives."""
    model = build_model(model_cfg, vocab_size, initialize=load is None)
    if load is not None:
        checkpoint.load_model(load, model)
    return frozen(model)


def _real_vocab_shard(logits: torch.Tensor, vocab_size: int, tp_group) -> tuple:
    """(fp32 logits with padding ids at -inf, this shard's first global id, TP size)."""
    v_local = logits.shape[-1]
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    offset = 0 if tp == 1 else dist.get_rank(tp_group) * v_local
    ids = torch.arange(offset, offset + v_local, device=logits.device)  # [v/tp]
    return logits.float().masked_fill(ids >= vocab_size, float("-inf")), offset, tp


def vocab_parallel_argmax(
    logits: torch.Tensor,  # [..., v/tp] this rank's vocabulary shard
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """`[...]` int64: the global id of the largest logit among ids < `vocab_size`."""
    masked, offset, tp = _real_vocab_shard(logits, vocab_size, tp_group)
    local = masked.argmax(dim=-1)  # [...]
    value = masked.gather(-1, local.unsqueeze(-1)).squeeze(-1)  # [...]
    if tp == 1:
        return local + offset
    values, indices = _gather_shards(value, local + offset, tp, tp_group)  # [tp, ...] each
    best = values.argmax(dim=0, keepdim=True)  # [1, ...] first (lowest-id) rank wins
    return indices.gather(0, best).squeeze(0)


def _gather_shards(values: torch.Tensor, ids: torch.Tensor, tp: int, tp_group) -> tuple:
    """Every TP rank's (values, global ids) of its own best logits, stacked: `[tp, ...]` each."""
    all_values = [torch.empty_like(values) for _ in range(tp)]
    all_ids = [torch.empty_like(ids) for _ in range(tp)]
    dist.all_gather(all_values, values, group=tp_group)
    dist.all_gather(all_ids, ids, group=tp_group)
    return torch.stack(all_values), torch.stack(all_ids)


def vocab_parallel_topk(
    logits: torch.Tensor,  # [n, v/tp] this rank's vocabulary shard
    k: int,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """`[n, k]` int64: global ids of the k largest logits among ids < `vocab_size`, largest
    first (each shard's own top k, then the top k of those)."""
    masked, offset, tp = _real_vocab_shard(logits, vocab_size, tp_group)
    values, local = masked.topk(k, dim=-1)  # [n, k]
    if tp == 1:
        return local + offset
    all_values, all_ids = _gather_shards(values, local + offset, tp, tp_group)  # [tp, n, k]
    n = values.shape[0]
    all_values = all_values.movedim(0, 1).reshape(n, tp * k)  # [n, tp*k]
    best = all_values.topk(k, dim=-1).indices  # [n, k]
    return all_ids.movedim(0, 1).reshape(n, tp * k).gather(-1, best)


def position_stats(
    model: list,
    microbatches: list[dict],
    vocab_size: int,
    chunk_tokens: int,
    with_argmax: bool,
    top_k: int = 0,
) -> list[dict]:
    """One forward-only pass. Each microbatch holds tokens, labels `[b, s]` int64 and mask
    `[b, s]` bool (the positions to report); all share one shape. Returns, on every rank, per
    microbatch: loss and entropy `[k]` fp32 and, with `with_argmax`, argmax `[k]` int64, and with
    `top_k`, "top" `[k, top_k]` int64 (most probable first) at the k masked positions in
    row-major order."""
    tp_group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        tp_group = None

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(platform.device()) for k, v in next(data_iterator).items()}
        tokens, mask = batch["tokens"], batch["mask"]

        def loss_func(logits):  # [b, s, v/tp]
            loss, entropy = vocab_parallel_ce_entropy(
                logits, batch["labels"], tp_group=tp_group, chunk_tokens=chunk_tokens
            )
            report = {"loss": loss[mask].cpu(), "entropy": entropy[mask].cpu()}
            if with_argmax:
                report["argmax"] = vocab_parallel_argmax(logits[mask], vocab_size, tp_group).cpu()
            if top_k:
                top = vocab_parallel_topk(logits[mask], top_k, vocab_size, tp_group)
                report["top"] = top.cpu()
            return logits.new_zeros(()), torch.ones((), dtype=torch.int), report

        return forward_logits(chunk, tokens, position_ids(tokens)), loss_func

    with torch.no_grad():
        reports = run_schedule(model, forward_step, microbatches, forward_only=True)
    return parallel.broadcast_object_from_last_stage(
        list(reports) if ps.is_pipeline_last_stage() else None
    )


def padded_microbatches(
    rows: list[list[int]], masks: list[list[bool]], length: int, micro_batch: int, pad_id: int
) -> list[dict]:
    """Token rows (inputs + one label after the last input each) right-padded to `length`
    inputs, in microbatches of `micro_batch` rows (the last one filled with empty rows, whose
    mask is all False). `masks[i]` marks row i's input positions to report."""
    out = []
    for first in range(0, len(rows), micro_batch):
        tokens = torch.full((micro_batch, length + 1), pad_id, dtype=torch.long)  # [b, s+1]
        mask = torch.zeros(micro_batch, length, dtype=torch.bool)  # [b, s]
        for i, (row, row_mask) in enumerate(
            zip(rows[first : first + micro_batch], masks[first : first + micro_batch], strict=True)
        ):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask})
    return out


def stats_in_groups(
    model, batches: list[dict], vocab_size: int, chunk_tokens: int, with_argmax: bool,
    top_k: int = 0,
) -> list[dict]:  # fmt: skip
    """`position_stats` over groups of microbatches, with a progress bar on rank 0."""
    out = []
    group = 32  # microbatches per schedule call: progress without a long pipeline bubble
    bar = tqdm(total=len(batches), desc="forward", unit="mb", disable=dist.get_rank() != 0)
    with bar:
        for first in range(0, len(batches), group):
            part = batches[first : first + group]
            out += position_stats(model, part, vocab_size, chunk_tokens, with_argmax, top_k)
            bar.update(len(part))
    return out


def tokenizer_and_model(cfg):
    """The tokenizer and this rank's frozen stage of `--load` (vocabulary padded as the trainer
    pads it)."""
    tokenizer = tokenizer_of(cfg.data)
    vocab = model_vocab(cfg, tokenizer)
    return tokenizer, build_eval_model(cfg.model, vocab, cfg.checkpoint.load)
