"""The RL pass's microbatches, built from a step's groups (problems.Group: request, result,
advantages), in one of two layouts (`--rl-layout`), each a typed batch that knows its forward:

- `RowsBatch` (rows): the G rows of prompt + response, label position i predicting token i+1;
  `resp_mask` marks the labels that are response tokens. By default one microbatch per group,
  all padded on the right to the step's longest sequence so the pipeline schedule sees one shape;
  with `rows`, each group's rows are split into microbatches of at most that many rows, each
  padded only to its own longest row.
- `SharedPrefixBatch` (shared_prefix): one row per group holding the prompt once, then each
  response without its last token (only ever a label), under a block mask with RoPE positions
  that continue from the prompt's end (model/shared_prefix.py).

In both, the per-token tensors (labels, resp_mask, old_logp) are `[G, L]` and `logits(model)`
gives, on the last stage, the `[G, L, v/tp]` logits that predict `labels`. Lengths are rounded
up to `multiple` (TP, with sequence parallelism). The loss is a per-token (or per-sequence) sum
over a global count, so every layout gives the same total loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.utils import unwrap_model

from megatron_rmt.compute import Computed
from megatron_rmt.model.logits import forward_logits
from megatron_rmt.model.shared_prefix import PROMPT, block_mask, rope_at
from megatron_rmt.schedule import position_ids


class _OnDevice:
    """`to(device)`: the same batch with every tensor there (the pipeline builds them on CPU)."""

    def to(self, device):
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
        }
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True)
class RowsBatch(_OnDevice):
    tokens: torch.Tensor  # [g, L]
    labels: torch.Tensor  # [g, L]
    resp_mask: torch.Tensor  # [g, L]
    old_logp: torch.Tensor  # [g, L]
    advantages: torch.Tensor  # [g]

    def logits(self, model) -> torch.Tensor:
        """Last stage: `[g, L, v/tp]`; other stages: the hidden states."""
        return forward_logits(model, self.tokens, position_ids(self.tokens))

    def computed(self) -> Computed:
        g, length = self.tokens.shape
        return Computed(g * length, length, g * length)


@dataclass(frozen=True)
class SharedPrefixBatch(_OnDevice):
    tokens: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S]: each response continues from the prompt's end
    segments: torch.Tensor  # [1, S]: 0 prompt, k + 1 response k, -1 padding
    rows: torch.Tensor  # [1, G * L]: the position whose logits predict each response token
    labels: torch.Tensor  # [G, L]
    resp_mask: torch.Tensor  # [G, L]
    old_logp: torch.Tensor  # [G, L]
    advantages: torch.Tensor  # [G]

    def logits(self, model) -> torch.Tensor:
        """Last stage: `[G, L, v/tp]`, only where a response label is; other stages: hidden."""
        mask = block_mask(self.segments)
        with rope_at(model, self.position_ids):
            out = forward_logits(model, self.tokens, self.position_ids, mask, rows=self.rows)
        if not unwrap_model(model).post_process:
            return out
        return out.reshape(*self.labels.shape, out.shape[-1])  # [1, G * L, v] -> [G, L, v]

    def computed(self) -> Computed:
        s = self.tokens.shape[1]
        return Computed(s, s, self.rows.numel())


def builder(cfg, pad_id: int) -> Callable[[list], list]:
    """The run's layout (`--rl-layout`, `--rl-micro-batch-rows`): groups (each with a result
    and advantages) -> the step's RL microbatches."""
    multiple = length_multiple(cfg)
    if cfg.model.rl_layout == "shared_prefix":
        return lambda groups: shared_prefix_batches(groups, pad_id, multiple)
    return lambda groups: rows_batches(groups, pad_id, cfg.rmt.rl_micro_batch_rows, multiple)


def length_multiple(cfg) -> int:
    """RL rows are padded to a multiple of TP when sequence parallelism splits them over TP."""
    return cfg.parallel.tensor_model_parallel_size if cfg.model.sequence_parallel else 1


def rows_batches(
    groups: list, pad_id: int, rows: int | None = None, multiple: int = 1
) -> list[RowsBatch]:
    """Rows layout (see the module docstring)."""
    if not groups:
        return []
    if rows is None:
        # The last token of the longest sequence is only ever a label, never an input.
        length = max(
            len(g.request.prompt_ids) + len(r) for g in groups for r in g.result.responses
        ) - 1  # fmt: skip
        return [_rows(g, range(len(g.result.responses)), pad_id, length, multiple) for g in groups]
    out = []
    for g in groups:  # each group's rows, longest first, `rows` at a time
        responses = g.result.responses
        order = sorted(range(len(responses)), key=lambda k: -len(responses[k]))
        for start in range(0, len(order), rows):
            part = order[start : start + rows]
            length = len(g.request.prompt_ids) + len(responses[part[0]]) - 1
            out.append(_rows(g, part, pad_id, length, multiple))
    return out


def _rows(group, part, pad_id: int, length: int, multiple: int) -> RowsBatch:
    """The rows `part` of one group as a microbatch of `length` label positions (rounded up to
    `multiple`)."""
    length = -(-length // multiple) * multiple
    n = len(part)
    tokens = torch.full((n, length + 1), pad_id, dtype=torch.long)  # [n, L+1]
    resp_mask = torch.zeros(n, length)  # [n, L]
    old_logp = torch.zeros(n, length)  # [n, L]
    prompt = group.request.prompt_ids
    p = len(prompt)
    for row, k in enumerate(part):
        resp, lps = group.result.responses[k], group.result.logprobs[k]
        tokens[row, :p] = torch.tensor(prompt)
        tokens[row, p : p + len(resp)] = torch.tensor(resp, dtype=torch.long)
        resp_mask[row, p - 1 : p - 1 + len(resp)] = 1.0
        old_logp[row, p - 1 : p - 1 + len(resp)] = torch.tensor(lps)
    return RowsBatch(
        tokens=tokens[:, :-1],
        labels=tokens[:, 1:],
        resp_mask=resp_mask,
        old_logp=old_logp,
        advantages=group.advantages[list(part)].float(),
    )


def shared_prefix_batches(groups: list, pad_id: int, multiple: int = 1) -> list[SharedPrefixBatch]:
    """Shared-prefix layout: S and L are the step's largest, so the pipeline schedule sees one
    shape; S is rounded up to `multiple` (TP under sequence parallelism)."""
    if not groups:
        return []
    seq = max(
        len(g.request.prompt_ids) + sum(max(len(r) - 1, 0) for r in g.result.responses)
        for g in groups
    )
    seq = -(-seq // multiple) * multiple
    width = max(max(max(len(r) for r in g.result.responses) for g in groups), 1)
    return [_shared_prefix(g, pad_id, seq, width) for g in groups]


def _shared_prefix(group, pad_id: int, seq: int, width: int) -> SharedPrefixBatch:
    prompt, res = group.request.prompt_ids, group.result
    g, p = len(res.responses), len(prompt)
    tokens = torch.full((seq,), pad_id, dtype=torch.long)
    positions = torch.zeros(seq, dtype=torch.long)
    segments = torch.full((seq,), -1, dtype=torch.long)
    rows = torch.zeros(g, width, dtype=torch.long)
    labels = torch.full((g, width), pad_id, dtype=torch.long)
    resp_mask = torch.zeros(g, width)
    old_logp = torch.zeros(g, width)
    tokens[:p] = torch.tensor(prompt)
    positions[:p] = torch.arange(p)
    segments[:p] = PROMPT
    start = p
    for k, (resp, lps) in enumerate(zip(res.responses, res.logprobs, strict=True)):
        n = len(resp)
        inputs = max(n - 1, 0)
        tokens[start : start + inputs] = torch.tensor(resp[:inputs], dtype=torch.long)
        positions[start : start + inputs] = torch.arange(p, p + inputs)
        segments[start : start + inputs] = k + 1
        # Token t is predicted by the prompt's last position (t = 0) or by token t - 1.
        rows[k, :n] = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + inputs)])
        labels[k, :n] = torch.tensor(resp, dtype=torch.long)
        resp_mask[k, :n] = 1.0
        old_logp[k, :n] = torch.tensor(lps)
        start += inputs
    return SharedPrefixBatch(
        tokens=tokens.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        segments=segments.unsqueeze(0),
        rows=rows.reshape(1, -1),
        labels=labels,
        resp_mask=resp_mask,
        old_logp=old_logp,
        advantages=group.advantages.float(),
    )
