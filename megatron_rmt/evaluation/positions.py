"""Positions of held-out (or training) documents drawn by difficulty: the model's entropy at
every candidate position (the trainer's rules, on the trainer's windows), levels by the trainer's
thresholds or by quantiles over the whole set, and a seeded draw of so many per level. The
evaluation set (evaluate build-set) and the format cold start (coldstart.py) draw with it.
"""

import torch

from megatron_rmt import selection
from megatron_rmt.evaluation import evalset, forward
from megatron_rmt.jsonl import InputError
from megatron_rmt.problems import CONTINUATION_TOKENS


def draw_positions(
    cfg, tokenizer, model: list, docs: list[list[int]], per_level: int, seed: int,
    micro_batch: int, source: str,
) -> tuple[list[evalset.EvalPosition], dict]:  # fmt: skip
    """The model's entropy at every candidate position of `docs` (cut into the trainer's
    windows), levels by the trainer's rules, and `per_level` positions per level drawn with
    `seed`. Returns the positions (document order) and the thresholds and counts."""
    r = cfg.rmt
    windows = evalset.document_windows(docs, cfg.model.seq_length)
    rows = [w for _, _, w in windows]
    masks = [_candidates(w, tokenizer.eod, r.min_context) for w in rows]
    found = [(i, j) for i, m in enumerate(masks) for j, ok in enumerate(m) if ok]
    if not found:
        raise InputError(f"{source}: no candidate positions (min_context {r.min_context})")
    length = max(len(w) - 1 for w in rows)
    batches = forward.padded_microbatches(rows, masks, length, micro_batch, tokenizer.eod)
    stats = forward.stats_in_groups(
        model, batches, tokenizer.vocab_size, r.entropy_chunk_tokens, False
    )
    entropy = torch.cat([s["entropy"] for s in stats])  # [m], in the order of `found`
    every = torch.ones_like(entropy, dtype=torch.bool)
    thresholds = tuple(r.entropy_thresholds)
    if r.bucket_mode == "quantile":  # over the whole held-out set at once
        thresholds = selection.quantile_thresholds(entropy, every)
    levels = selection.difficulty_levels(entropy, every, thresholds)
    keep = evalset.sample_per_level(levels, per_level, seed).tolist()
    positions = []
    for k in keep:
        doc, start, window = windows[found[k][0]]
        j = found[k][1]
        positions.append(
            evalset.EvalPosition(
                doc=doc,
                offset=start + j,
                prefix_ids=window[: j + 1],
                target_id=window[j + 1],
                target_text=tokenizer.token_text(window[j + 1]),
                continuation_ids=window[j + 1 : j + 1 + CONTINUATION_TOKENS],
                entropy=float(entropy[k]),
                level=int(levels[k]),
            )
        )
    counts = {
        "thresholds": list(thresholds),
        "candidates": len(found),
        "available": [int((levels == d).sum()) for d in range(len(selection.LEVELS))],
        "sampled": [sum(p.level == d for p in positions) for d in range(len(selection.LEVELS))],
    }
    return positions, counts


def _candidates(window: list[int], eod: int, min_context: int) -> list[bool]:
    """The trainer's candidate rule on one window (its context restarts at the window start)."""
    ids = torch.tensor(window)
    tokens, labels = ids[None, :-1], ids[None, 1:]  # [1, s]
    context = torch.arange(1, tokens.shape[1] + 1)[None]  # [1, s]
    mask = selection.candidate_mask(
        context, torch.ones_like(context), tokens, labels, eod_id=eod, min_context=min_context
    )
    return mask[0].tolist()
