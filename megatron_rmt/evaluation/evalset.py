"""The evaluation set: fixed positions of held-out documents, each with its difficulty.

Difficulty must be the same for every model compared, so it is measured once, by a proxy model,
and written down. The file is JSONL: a header line `{"header": {...}}` recording how the set was
made (format, source, proxy, thresholds, seed, counts), then one position per line:

    {"doc": 3, "offset": 57, "prefix_ids": [...], "target_id": 11, "target_text": " x",
     "continuation_ids": [...], "entropy": 1.23, "level": "medium"}

`prefix_ids` is the context the proxy saw (the document from its window start up to and
including `offset`), so a model is evaluated on exactly that input; `target_id` is the token at
`offset + 1`. Storing the ids makes the set self-contained (no corpus needed to use it).

Deliberate choices:
- Documents are cut into consecutive windows of `seq_length` input tokens, as the trainer's
  windows are; a position's context restarts at its window start, like the trainer's
  `context_len`, so "enough context" and the prefix mean the same thing in both.
- Sampling: per level, a uniform draw without replacement of `per_level` positions (all of them
  when the level has fewer), from one `torch.Generator` seeded with `seed`, levels in order easy,
  medium, hard. The kept positions are written in document order.
"""

import json
from dataclasses import asdict, dataclass

import torch

from megatron_rmt.jsonl import InputError, records
from megatron_rmt.selection import LEVELS

FORMAT = "megatron_rmt.evalset/1"


@dataclass(frozen=True)
class EvalPosition:
    doc: int  # document index in the source
    offset: int  # index in the document of the last prefix token
    prefix_ids: list[int]
    target_id: int
    target_text: str
    continuation_ids: list[int]  # the target and the true tokens after it (window permitting)
    entropy: float  # the proxy's predictive entropy at `offset`, nats
    level: int  # 0 easy, 1 medium, 2 hard


def document_windows(
    documents: list[list[int]], seq_length: int
) -> list[tuple[int, int, list[int]]]:
    """(doc index, start offset, tokens) for consecutive windows of up to `seq_length` inputs
    plus the label after the last; windows too short to hold one label are dropped."""
    out = []
    for d, ids in enumerate(documents):
        for start in range(0, len(ids) - 1, seq_length):
            out.append((d, start, ids[start : start + seq_length + 1]))
    return out


def sample_per_level(
    levels: torch.Tensor,  # [m] int: a level per candidate position, NOT_CANDIDATE elsewhere
    per_level: int,
    seed: int,
) -> torch.Tensor:
    """`[k]` sorted indices into `levels`: up to `per_level` uniformly drawn from each level."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for level in range(len(LEVELS)):
        pool = (levels == level).nonzero().flatten()
        order = torch.randperm(pool.numel(), generator=gen)
        picked.append(pool[order[:per_level]])
    return torch.cat(picked).sort().values


def write_set(path: str, header: dict, positions: list[EvalPosition]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"header": {"format": FORMAT, **header}}) + "\n")
        for p in positions:
            fh.write(json.dumps({**asdict(p), "level": LEVELS[p.level]}) + "\n")


_FIELDS = {
    "doc": int,
    "offset": int,
    "prefix_ids": list,
    "target_id": int,
    "target_text": str,
    "continuation_ids": list,
    "entropy": (int, float),
    "level": str,
}


def read_set(path: str) -> tuple[dict, list[EvalPosition]]:
    """The header and positions of a set file; `FILE:LINE: problem` for anything malformed."""
    header, positions = None, []
    for number, record in records(path):
        if header is None:
            header = _header(path, number, record)
        else:
            positions.append(_position(path, number, record))
    if header is None:
        raise InputError(f"{path}: empty file, expected a header line")
    if not positions:
        raise InputError(f"{path}: no positions after the header")
    return header, positions


def _header(path: str, number: int, record: dict) -> dict:
    header = record.get("header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(
            f'{path}:{number}: expected a header line {{"header": {{"format": "{FORMAT}", ...}}}}'
            " (build one with `python -m megatron_rmt.evaluate build-set`)"
        )
    return header


def _position(path: str, number: int, record: dict) -> EvalPosition:
    for key, kind in _FIELDS.items():
        value = record.get(key)
        if value is None:
            raise InputError(f"{path}:{number}: missing field {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{path}:{number}: field {key!r} has the wrong type")
    for key in ("prefix_ids", "continuation_ids"):
        if not record[key] or not all(isinstance(t, int) and t >= 0 for t in record[key]):
            raise InputError(f"{path}:{number}: {key!r} must be a non-empty list of token ids")
    if record["level"] not in LEVELS:
        raise InputError(f"{path}:{number}: level {record['level']!r} is not one of {LEVELS}")
    fields = {key: record[key] for key in _FIELDS}
    return EvalPosition(**{**fields, "entropy": float(fields["entropy"]),
                           "level": LEVELS.index(fields["level"])})  # fmt: skip
