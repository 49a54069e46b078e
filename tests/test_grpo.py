"""Group advantages against a direct per-group computation."""

import statistics

import pytest
import torch

from megatron_rmt.grpo import group_advantages


def test_matches_direct_formula_with_population_std():
    rewards = torch.tensor([[0.0, 1.0, 0.9, 0.1], [0.3, 0.3, 0.2, 1.0]])
    adv, zero = group_advantages(rewards, delta=1e-6)
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.fmean(row), statistics.pstdev(row)
        expected = [(r - mean) / (std + 1e-6) for r in row]
        assert adv[g].tolist() == pytest.approx(expected, rel=1e-5)
    assert zero == 0


def test_two_samples_give_plus_minus_one():
    adv, _ = group_advantages(torch.tensor([[0.0, 1.0]]), delta=0.0)
    assert adv.tolist() == [[-1.0, 1.0]]


def test_all_equal_groups_are_exactly_zero_and_counted():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7, 0.7, 0.7]])
    adv, zero = group_advantages(rewards)
    assert zero == 3
    assert torch.equal(adv[[0, 1, 3]], torch.zeros(3, 3))
    assert adv[2].sum().abs() < 1e-5 and adv[2, 1] > 0
