"""Eq. 1 and Eq. 2 against hand-computed values and their edge cases."""

import math

import pytest
import torch

from megatron_rmt.budget import length_reward, max_new_tokens, token_budget


def test_budget_schedule_eq1():
    assert token_budget(0, 100) == 800  # t = 0: B_0
    assert token_budget(100, 100) == 160  # t = T: floor(800 * 0.2)
    assert token_budget(50, 100) == math.floor(800 * 0.2**0.5)  # 357
    assert token_budget(100, 100, b0=4, b_min=1, gamma=0.2) == 1  # floor(0.8) -> B_min
    assert token_budget(100, 100, b0=800, b_min=200) == 200
    budgets = [token_budget(t, 100) for t in range(101)]
    assert budgets == sorted(budgets, reverse=True)  # never increases
    with pytest.raises(ValueError):
        token_budget(0, 0)


@pytest.mark.parametrize(
    "length,budget,expected",
    [
        (0, 10, 0.0),  # l = 0
        (5, 10, 0.5),
        (10, 10, 1.0),  # l = B_t: the peak
        (15, 10, 0.5),
        (20, 10, 0.0),  # l = 2 B_t
        (21, 10, 0.0),  # l > 2 B_t
        (500, 10, 0.0),
        (0, 1, 0.0),  # B_t = 1
        (1, 1, 1.0),
        (2, 1, 0.0),
        (3, 1, 0.0),
    ],
)
def test_length_reward_eq2(length, budget, expected):
    assert length_reward(length, budget) == pytest.approx(expected)
    assert length_reward(length, budget, r_max=0.5) == pytest.approx(0.5 * expected)


def test_length_reward_is_vectorised():
    lengths = torch.tensor([0, 3, 4, 6, 8, 9, 100])
    got = length_reward(lengths, 4)
    expected = torch.tensor([length_reward(int(n), 4) for n in lengths])
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32
    with pytest.raises(ValueError):
        length_reward(3, 0)


def test_max_new_tokens_leaves_room_beyond_twice_the_budget():
    assert max_new_tokens(800, 48) == 1648
    assert max_new_tokens(1, 16) > 2 * 1
