"""What each method variant switches on: the paper's RMT, its three ablations, the RPT baseline
and plain NTP mid-training (paper sections 5.2 and 5.5)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    selection: str | None  # "curriculum" (CAS), "uniform", "all" (RPT's filter) or None
    budget: bool  # dynamic token budget: budget sentence + length reward
    prefix_reward: bool  # RPT's byte-prefix reward instead of exact token match
    ntp: bool  # token-inclusive NTP loss on the positions not in C

    @property
    def rl(self) -> bool:
        return self.selection is not None


VARIANTS = {
    "rmt": Variant(selection="curriculum", budget=True, prefix_reward=False, ntp=True),
    "no_dtb": Variant(selection="curriculum", budget=False, prefix_reward=False, ntp=True),
    "no_cas": Variant(selection="uniform", budget=True, prefix_reward=False, ntp=True),
    "no_ntp": Variant(selection="curriculum", budget=True, prefix_reward=False, ntp=False),
    "rpt": Variant(selection="all", budget=False, prefix_reward=True, ntp=False),
    "ntp": Variant(selection=None, budget=False, prefix_reward=False, ntp=True),
}


def ntp_weight(variant: Variant, rmt_lambda: float) -> float:
    """lambda next to RL; 1 for plain NTP; 0 (forward only, for the entropies) without NTP."""
    if not variant.ntp:
        return 0.0
    return rmt_lambda if variant.rl else 1.0
