"""Dynamic token budget (paper section 4.1): the budget schedule and the length reward.

- Eq. 1: B_t = max(B_min, floor(B_0 * gamma^(t/T))), B_0 = 800, B_min = 1, gamma = 0.2: the
  budget decays exponentially from B_0 to about gamma * B_0 at the last step.
- Eq. 2: a triangle peaking at l = B_t: r_max * l / B_t up to B_t, r_max * (2 B_t - l) / B_t up
  to 2 B_t, 0 beyond. l is the number of tokens inside <think></think>.
- Responses are capped at max_response_tokens (the paper's fixed cap, 2048), which must leave
  room for 2 B_0 thinking tokens plus the answer. `max_new_tokens` (2 B_t + answer) is the
  cheaper opt-in cap (`--response-cap budget`, see problems.response_cap).
"""

import math

import torch


def token_budget(
    step: int, total_steps: int, b0: int = 800, b_min: int = 1, gamma: float = 0.2
) -> int:
    """Eq. 1: the thinking budget B_t at `step` of `total_steps` (t in [0, T])."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return max(b_min, math.floor(b0 * gamma ** (step / total_steps)))


def length_reward(length, budget: int, r_max: float = 1.0):
    """Eq. 2: r_len(l; B_t) for an int/float or a tensor of think lengths (elementwise)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if isinstance(length, torch.Tensor):
        n = length.to(torch.float32)
        return r_max * torch.clamp(torch.minimum(n, 2 * budget - n), min=0.0) / budget
    return r_max * max(0.0, min(length, 2 * budget - length)) / budget


def max_new_tokens(budget: int, answer_tokens: int) -> int:
    """Sampling cap for a response: 2 B_t thinking tokens (the last length that still earns a
    length reward) plus `answer_tokens`, which must cover the `</think>` tag and the boxed
    answer (about 16 tokens for a one-token prediction; leave more for math answers)."""
    return 2 * budget + answer_tokens


def budget_deviation(think_tokens: torch.Tensor, budget: int) -> float | None:
    """How closely reasoning follows the budget: mean |l - B| / B over the think lengths given
    (`[n]`, e.g. the responses whose think block closed); None when there are none."""
    if think_tokens.numel() == 0:
        return None
    return float((think_tokens.double() - budget).abs().mean() / budget)
