"""The boundary between the trainer and whatever samples responses.

The trainer sends token ids (never text, so nothing is re-tokenised) and receives token ids with
the log-probabilities they were sampled with, tagged with the weight version that produced them.
Any engine (the embedded one, a vLLM client) implements `RolloutEngine`.
"""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RolloutRequest:
    prompt_ids: list[int]
    n: int  # G samples
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class RolloutResult:
    responses: list[list[int]]  # n responses, each ending at EOS or at max_tokens
    logprobs: list[list[float]]  # per response token, at the sampling temperature
    weight_version: int


class RolloutEngine(Protocol):
    # True: every rank of a model-parallel replica takes part in generate() (the embedded engine
    # runs the model). False: one rank per replica calls it and shares the results.
    collective: bool

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]: ...

    def sync_weights(self, version: int) -> None:
        """Make the engine sample from the trainer's current weights, tagged `version`."""
