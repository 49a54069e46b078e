"""Buckets, candidate filtering, curriculum (Eq. 4) and the samplers, against direct rules."""

import pytest
import torch

from megatron_rmt.data import context_lengths
from megatron_rmt.selection import (
    NOT_CANDIDATE,
    candidate_mask,
    curriculum_probs,
    difficulty_levels,
    quantile_thresholds,
    rpt_positions,
    sample_positions,
    select_positions,
    unit_ids,
)

EOD = 0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_candidate_mask_applies_every_rule():
    tokens = torch.tensor([[5, 6, 7, EOD, 8, 9, 4]])
    labels = torch.tensor([[6, 7, EOD, 8, 9, 4, 3]])
    loss_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1]])
    ctx = context_lengths(tokens, EOD)  # [1, 2, 3, 4, 1, 2, 3] (data.py: EOD ends its document)
    got = candidate_mask(ctx, loss_mask, tokens, labels, eod_id=EOD, min_context=2)
    # pos 0: short context; 2: label EOD; 3: token EOD; 4: short; 5: loss mask 0.
    assert got.tolist() == [[False, True, False, False, False, False, True]]


def test_levels_are_disjoint_bins():
    entropy = torch.tensor([[0.1, 0.5, 0.99, 1.0, 1.49, 1.5, 3.0, 2.0]])
    candidates = torch.tensor([[True] * 7 + [False]])
    got = difficulty_levels(entropy, candidates)
    n = NOT_CANDIDATE
    assert got.tolist() == [[n, 0, 0, 1, 1, 2, 2, n]]
    with pytest.raises(ValueError):
        difficulty_levels(entropy, candidates, (1.0, 0.5, 1.5))


def test_quantile_thresholds_use_only_candidates():
    entropy = torch.arange(100, dtype=torch.float32).view(2, 50)
    candidates = entropy < 80  # 0..79
    got = quantile_thresholds(entropy, candidates, (0.5, 0.75, 0.9))
    expected = torch.quantile(torch.arange(80.0), torch.tensor([0.5, 0.75, 0.9])).tolist()
    assert got == pytest.approx(expected)
    assert quantile_thresholds(entropy, torch.zeros_like(candidates)) == (float("inf"),) * 3


def test_curriculum_follows_eq4():
    p1, p2 = (0.5, 0.4, 0.1), (0.1, 0.3, 0.6)
    assert curriculum_probs(0, 100) == p1
    assert curriculum_probs(29, 100) == p1
    assert curriculum_probs(30, 100) == pytest.approx(p1)  # tau = 0 at t1
    assert curriculum_probs(50, 100) == pytest.approx((0.3, 0.35, 0.35))  # tau = 1/2
    assert curriculum_probs(60, 100) == pytest.approx(
        tuple(0.25 * a + 0.75 * b for a, b in zip(p1, p2, strict=True))
    )
    assert curriculum_probs(70, 100) == p2
    assert curriculum_probs(100, 100) == p2
    assert sum(curriculum_probs(45, 100)) == pytest.approx(1.0)


def test_sampler_respects_k_candidates_and_seed():
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(-1, 3, (4, 64), generator=g)
    a = sample_positions(levels, (0.2, 0.3, 0.5), 5, gen(7))
    b = sample_positions(levels, (0.2, 0.3, 0.5), 5, gen(7))
    assert torch.equal(a, b)  # same seed, same positions: what keeps ranks in agreement
    assert a.sum(dim=1).tolist() == [5, 5, 5, 5]  # a mask cannot pick a position twice
    assert (levels[a] != NOT_CANDIDATE).all()


def test_sampler_takes_everything_when_short_and_falls_back_to_nonempty_levels():
    levels = torch.full((2, 10), NOT_CANDIDATE)
    levels[0, [1, 4]] = 0  # only easy candidates, while p puts all mass on hard
    levels[1, 3] = 2
    got = sample_positions(levels, (0.0, 0.0, 1.0), 4, gen())
    assert torch.equal(got, levels != NOT_CANDIDATE)


def test_sampler_level_frequencies_follow_probs():
    # One candidate per level per "slot": the first draw's level follows p exactly.
    levels = torch.tensor([[0, 1, 2]]).repeat(4000, 1)
    probs = (0.5, 0.3, 0.2)
    chosen = sample_positions(levels, probs, 1, gen(3))
    freq = chosen.float().mean(dim=0)
    assert freq.tolist() == pytest.approx(probs, abs=0.03)


def test_sampler_is_uniform_within_a_level():
    levels = torch.tensor([[0, 0, 0, 0, 1]]).repeat(4000, 1)
    chosen = sample_positions(levels, (1.0, 0.0, 0.0), 1, gen(4))
    freq = chosen.float().mean(dim=0)
    assert freq[:4].tolist() == pytest.approx([0.25] * 4, abs=0.03)
    assert freq[4] == 0  # zero-probability level while another has candidates


def test_uniform_mode_caps_at_k_over_all_candidates():
    levels = torch.full((3, 20), NOT_CANDIDATE)
    levels[0, :12] = 2
    levels[1, 5:8] = 0
    got = select_positions(levels, "uniform", (1.0, 0.0, 0.0), 4, gen())
    assert got.sum(dim=1).tolist() == [4, 3, 0]
    assert (levels[got] != NOT_CANDIDATE).all()
    with pytest.raises(ValueError):
        select_positions(levels, "all", (1.0, 0.0, 0.0), 4, gen())  # RPT: rpt_positions


@pytest.mark.parametrize("units", [None, "document"])
def test_uniform_ignores_the_levels_that_cas_follows(units):
    # Every unit: one easy candidate, three hard ones, one non-candidate; p wants easy only.
    levels = torch.tensor([[0, 2, 2, 2, NOT_CANDIDATE]]).repeat(4000, 1)
    ids = unit_ids(torch.arange(1, 6).repeat(4000, 1), "document") if units else None
    p = (1.0, 0.0, 0.0)
    uniform = select_positions(levels, "uniform", p, 1, gen(8), ids).float().mean(dim=0)
    cas = select_positions(levels, "curriculum", p, 1, gen(8), ids).float().mean(dim=0)
    assert uniform[:4].tolist() == pytest.approx([0.25] * 4, abs=0.03) and uniform[4] == 0
    assert cas.tolist() == [1, 0, 0, 0, 0]


# Two rows: row 0 packs documents A (0..3), B (4..8, after the EOD at 3), C (9..11);
# row 1 is one document (a piece that began in an earlier window).
TOKENS = torch.tensor([[5, 6, 7, EOD, 8, 9, 4, 3, EOD, 6, 7, 8], [9] * 12])
CONTEXT = context_lengths(TOKENS, EOD)


def test_unit_ids_number_documents_and_windows_in_reading_order():
    docs = [[0] * 4 + [1] * 5 + [2] * 3, [3] * 12]
    assert unit_ids(CONTEXT, "document").tolist() == docs
    assert unit_ids(CONTEXT, "window").tolist() == [[0] * 12, [1] * 12]
    with pytest.raises(ValueError):
        unit_ids(CONTEXT, "sentence")


@pytest.mark.parametrize("mode", ["curriculum", "uniform"])
def test_document_unit_picks_k_per_document(mode):
    levels = torch.randint(0, 3, TOKENS.shape, generator=gen(5))
    levels[0, 9:] = NOT_CANDIDATE  # document C has no candidates
    units = unit_ids(CONTEXT, "document")
    for seed in range(20):
        got = select_positions(levels, mode, (0.3, 0.3, 0.4), 2, gen(seed), units)
        per_doc = [int(got[units == u].sum()) for u in range(4)]
        assert per_doc == [2, 2, 0, 2]
        assert (levels[got] != NOT_CANDIDATE).all()
        window = select_positions(levels, mode, (0.3, 0.3, 0.4), 2, gen(seed))
        assert window.sum(dim=1).tolist() == [2, 2]  # per window: 2 in the whole row


def test_rpt_trains_on_every_position_its_filter_keeps():
    entropy = torch.rand(TOKENS.shape, generator=gen(6)) * 2
    cand = candidate_mask(CONTEXT, torch.ones(TOKENS.shape), TOKENS, TOKENS, eod_id=EOD,
                          min_context=1)  # fmt: skip
    units = unit_ids(CONTEXT, "document")
    got = rpt_positions(entropy, cand, 0.8, 0, gen(), units)
    expected = [[bool(c and h >= 0.8) for c, h in zip(cr, hr, strict=True)]
                for cr, hr in zip(cand.tolist(), entropy.tolist(), strict=True)]  # fmt: skip
    assert got.tolist() == expected and got.sum() > 4
    capped = rpt_positions(entropy, cand, 0.8, 1, gen(), units)
    for u in range(4):  # the cap: at most one kept position per document, one if any
        assert int(capped[units == u].sum()) == min(1, int(got[units == u].sum()))
    assert (capped <= got).all()
