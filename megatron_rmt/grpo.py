"""GRPO's group-relative advantages (paper Eq. 6): A_i = (r_i - mean r) / (std r + delta).

The standard deviation is the population one (divide by G, not G - 1), reading Eq. 6's plain
"Std" as the spread of these G rewards: with G = 2 and rewards {0, 1} the advantages are exactly
-1 and +1. (Some trainers use the sample std; that only shrinks every advantage by
sqrt((G - 1) / G), 0.94 at G = 8.) A group whose rewards are all equal carries no signal; its
advantages are set to exactly 0 (floating-point means of equal numbers can be off by an ulp) and
it is counted, because a run where most groups are like that learns nothing and must show it.
"""

import torch


def group_advantages(
    rewards: torch.Tensor,  # [n_groups, G]
    delta: float = 1e-6,
) -> tuple[torch.Tensor, int]:
    """Returns (advantages [n_groups, G] fp32, number of all-equal groups)."""
    r = rewards.to(torch.float32)
    mean = r.mean(dim=1, keepdim=True)  # [n_groups, 1]
    std = r.std(dim=1, correction=0, keepdim=True)  # [n_groups, 1]
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # [n_groups, 1]
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + delta))
    return adv, int(flat.sum())
