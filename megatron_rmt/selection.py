"""Which positions become RL problems: candidates, difficulty buckets, curriculum and sampling.

Paper section 4.2 (curriculum-based adaptive sampling, CAS) with the choices it leaves open:
- Levels are disjoint entropy bins: below `tau_easy` not a candidate, `[easy, medium)` easy (0),
  `[medium, hard)` medium (1), `>= hard` hard (2). Defaults 0.5 / 1.0 / 1.5 nats (RPT's cut-offs
  made disjoint). Quantile mode takes the thresholds from the candidates' own entropies instead.
  `NOT_CANDIDATE` (-1) marks every other position.
- A position is a candidate only with real context: at least `min_context` tokens of the same
  document up to and including it (early positions look uncertain only because context is
  missing), a nonzero loss mask, and neither its token nor its label is end-of-document.
- Curriculum (Eq. 4): p(t) = p^{t1} before t1, linear to p^{t2} between t1 and t2, p^{t2} after;
  defaults (0.5, 0.4, 0.1) -> (0.1, 0.3, 0.6) at 30% and 70% of training (the paper's t1, t2;
  it does not publish the vectors).
- Sampling draws k positions per unit without replacement: a level from p(t) renormalised
  over the levels that still have candidates, then a position uniformly inside it. Fewer than k
  candidates: all are taken. Everything random comes from an explicit `torch.Generator`, so ranks
  seeded alike draw the same positions from the same levels.
- The unit (`unit_ids`) is a document (the paper's reading: its positions are drawn per text)
  or a whole packed window. Documents are told apart by `context_len` (1 at a window's first
  position and after every EOD), so a document cut by a window boundary is one unit in each
  window it reaches.
- Ablation `uniform` (without CAS) draws k uniformly among all candidates of a unit.
- Baseline RPT (`rpt_positions`) trains on every candidate its own entropy filter keeps
  (entropy >= its threshold, no levels, no curriculum), optionally capped per unit by a uniform
  draw to bound a step's rollouts.
`Selector` and `choose` put these together as the NTP pass applies them to one microbatch.
"""

from dataclasses import dataclass

import torch

from megatron_rmt.parallel import mix_seed

NOT_CANDIDATE = -1
LEVELS = ("easy", "medium", "hard")


def candidate_mask(
    context_len: torch.Tensor,  # [b, s]
    loss_mask: torch.Tensor,  # [b, s]
    tokens: torch.Tensor,  # [b, s]
    labels: torch.Tensor,  # [b, s]
    *,
    eod_id: int,
    min_context: int,
) -> torch.Tensor:
    """`[b, s]` bool: positions allowed to become RL problems (before any entropy test)."""
    return (context_len >= min_context) & (loss_mask > 0) & (tokens != eod_id) & (labels != eod_id)


def quantile_thresholds(
    entropy: torch.Tensor,  # [b, s]
    candidates: torch.Tensor,  # [b, s] bool
    quantiles: tuple[float, float, float] = (0.5, 0.75, 0.9),
) -> tuple[float, float, float]:
    """Thresholds at the given quantiles of the candidates' entropies (bottom half dropped,
    then easy / medium / hard = next 25% / 15% / top 10% by default). Computed over what the
    caller passes, e.g. one micro-batch; no candidates gives +inf (nothing is selected)."""
    values = entropy[candidates].float()
    if values.numel() == 0:
        return (float("inf"),) * 3
    q = torch.quantile(values, torch.tensor(quantiles, dtype=values.dtype, device=values.device))
    return tuple(q.tolist())


def difficulty_levels(
    entropy: torch.Tensor,  # [b, s]
    candidates: torch.Tensor,  # [b, s] bool
    thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5),
) -> torch.Tensor:
    """`[b, s]` int64: 0 easy, 1 medium, 2 hard, NOT_CANDIDATE elsewhere."""
    tau_easy, tau_medium, tau_hard = thresholds
    if not tau_easy <= tau_medium <= tau_hard:
        raise ValueError(f"thresholds must be non-decreasing, got {thresholds}")
    boundaries = torch.tensor(thresholds, dtype=entropy.dtype, device=entropy.device)
    # bucketize(right=True) counts thresholds <= H: 0 below tau_easy, 3 at or above tau_hard.
    levels = torch.bucketize(entropy, boundaries, right=True) - 1
    return torch.where(candidates & (levels >= 0), levels, NOT_CANDIDATE)


def curriculum_probs(
    step: int,
    total_steps: int,
    p_t1: tuple[float, float, float] = (0.5, 0.4, 0.1),
    p_t2: tuple[float, float, float] = (0.1, 0.3, 0.6),
    t1_frac: float = 0.3,
    t2_frac: float = 0.7,
) -> tuple[float, float, float]:
    """Eq. 4: (p_easy, p_medium, p_hard) at `step` of `total_steps`."""
    if not 0 <= t1_frac < t2_frac <= 1:
        raise ValueError(f"need 0 <= t1 < t2 <= 1, got {t1_frac}, {t2_frac}")
    t1, t2 = t1_frac * total_steps, t2_frac * total_steps
    if step < t1:
        return tuple(p_t1)
    if step >= t2:
        return tuple(p_t2)
    tau = (step - t1) / (t2 - t1)
    return tuple((1 - tau) * a + tau * b for a, b in zip(p_t1, p_t2, strict=True))


def unit_ids(context_len: torch.Tensor, unit: str) -> torch.Tensor:
    """`[b, s]` int64: the selection unit of every position, numbered 0, 1, ... in reading
    order. unit 'window': one per row; 'document': a new one wherever `context_len` is 1."""
    if unit == "window":
        starts = torch.zeros_like(context_len, dtype=torch.bool)
        starts[:, 0] = True
    elif unit == "document":
        starts = context_len == 1
    else:
        raise ValueError(f"unknown position unit {unit!r}")
    return (starts.flatten().cumsum(0) - 1).view(context_len.shape)


def _spans(shape: torch.Size, units: torch.Tensor | None) -> list[torch.Tensor]:
    """Flat position indices of each unit (rows when `units` is None), in unit order."""
    b, s = shape
    if units is None:
        return list(torch.arange(b * s).view(b, s))
    counts = torch.unique_consecutive(units.flatten().cpu(), return_counts=True)[1]
    return list(torch.arange(b * s).split(counts.tolist()))


def sample_positions(
    levels: torch.Tensor,  # [b, s] int, NOT_CANDIDATE or a level
    probs: tuple[float, float, float],
    k: int,
    generator: torch.Generator,
    units: torch.Tensor | None = None,  # [b, s] from unit_ids; None: one unit per row
) -> torch.Tensor:
    """CAS: `[b, s]` bool mask of up to k positions per unit (level first, then position)."""
    flat = levels.flatten().cpu()
    chosen = torch.zeros(flat.shape, dtype=torch.bool)
    weights = torch.tensor(probs, dtype=torch.float64)
    for span in _spans(levels.shape, units):
        pools = [span[flat[span] == d].tolist() for d in range(len(probs))]
        for _ in range(k):
            alive = torch.tensor([len(p) > 0 for p in pools], dtype=torch.float64)
            if alive.sum() == 0:
                break
            w = weights * alive
            # A level with candidates but zero probability is only used once all others are empty.
            level = torch.multinomial(w if w.sum() > 0 else alive, 1, generator=generator).item()
            pool = pools[level]
            pick = torch.randint(len(pool), (1,), generator=generator).item()
            chosen[pool.pop(pick)] = True
    return chosen.view(levels.shape).to(levels.device)


def sample_uniform(
    pool: torch.Tensor,  # [b, s] bool
    k: int,
    generator: torch.Generator,
    units: torch.Tensor | None = None,  # [b, s] from unit_ids; None: one unit per row
) -> torch.Tensor:
    """`[b, s]` bool: k `pool` positions per unit uniformly at random (all of them if fewer)."""
    flat = pool.flatten().cpu()
    chosen = torch.zeros(flat.shape, dtype=torch.bool)
    for span in _spans(pool.shape, units):
        inside = span[flat[span]]
        order = torch.randperm(inside.numel(), generator=generator)
        chosen[inside[order[:k]]] = True
    return chosen.view(pool.shape).to(pool.device)


def rpt_positions(
    entropy: torch.Tensor,  # [b, s]
    candidates: torch.Tensor,  # [b, s] bool
    threshold: float,
    cap: int,
    generator: torch.Generator,
    units: torch.Tensor | None = None,  # [b, s] from unit_ids; None: one unit per row
) -> torch.Tensor:
    """RPT: `[b, s]` bool, every candidate with entropy >= `threshold`; `cap` > 0 keeps a
    uniform draw of `cap` of them in a unit that has more (0: no cap)."""
    kept = candidates & (entropy >= threshold)
    return sample_uniform(kept, cap, generator, units) if cap > 0 else kept


def select_positions(
    levels: torch.Tensor,  # [b, s] int
    mode: str,
    probs: tuple[float, float, float],
    k: int,
    generator: torch.Generator,
    units: torch.Tensor | None = None,  # [b, s] from unit_ids; None: one unit per row
) -> torch.Tensor:
    """`[b, s]` bool mask C, k per unit. mode: 'curriculum' (CAS), 'uniform' (without CAS)."""
    if mode == "curriculum":
        return sample_positions(levels, probs, k, generator, units)
    if mode == "uniform":
        return sample_uniform(levels != NOT_CANDIDATE, k, generator, units)
    raise ValueError(f"unknown selection mode {mode!r}")


@dataclass(frozen=True)
class Selector:
    """How the NTP pass picks RL positions this step (None mode: plain NTP, nothing picked)."""

    mode: str | None  # "curriculum", "uniform", "all" (RPT) or None
    probs: tuple[float, float, float]
    k_per_unit: int  # positions per unit; for "all", the cap per unit (0: every kept position)
    thresholds: tuple[float, float, float] | None  # None: per-microbatch quantiles
    eod_id: int
    min_context: int
    seed: int
    unit: str = "window"  # "document" or "window" (unit_ids)
    rpt_threshold: float = 0.5  # "all": RPT's entropy filter, nats


def choose(batch: dict, entropy: torch.Tensor, sel: Selector):
    """One microbatch's C as a [b, s] bool mask and the difficulty level of every position."""
    if sel.mode is None:
        none = torch.zeros_like(entropy, dtype=torch.bool)
        return none, torch.full_like(entropy, NOT_CANDIDATE, dtype=torch.long)
    cand = candidate_mask(
        batch["context_len"],
        batch["loss_mask"],
        batch["tokens"],
        batch["labels"],
        eod_id=sel.eod_id,
        min_context=sel.min_context,
    )
    thresholds = sel.thresholds or quantile_thresholds(entropy, cand)
    levels = difficulty_levels(entropy, cand, thresholds)
    # Seeded by the samples themselves: every TP rank (and a resumed run) draws the same C.
    gen = torch.Generator().manual_seed(mix_seed(sel.seed, int(batch["sample_ids"][0])))
    units = unit_ids(batch["context_len"], sel.unit)
    if sel.mode == "all":  # RPT: levels are only reported (NOT_CANDIDATE below tau_easy)
        chosen = rpt_positions(entropy, cand, sel.rpt_threshold, sel.k_per_unit, gen, units)
    else:
        chosen = select_positions(levels, sel.mode, sel.probs, sel.k_per_unit, gen, units)
    return chosen, levels
