"""Math problems for post-training, streamed in reproducible epochs, resumable.

Input: a JSONL file with one problem per line, its statement under "problem" (MATH, MATH-500)
or "question" (GSM8K), and its final answer under "answer" (the content of the reference
solution's \\boxed{}, or GSM8K's number), as in ../shared/assets/math/. A malformed line is
reported as file:line and what was expected.

Each epoch visits every problem once in a permutation drawn from (seed, epoch); a step takes the
next `global_batch` problems of that order and each data-parallel rank its own contiguous share.
Everything follows from the number of problems consumed, so a resumed run continues exactly.
"""

from dataclasses import dataclass

import torch

from megatron_rmt import jsonl


@dataclass(frozen=True)
class MathProblem:
    text: str  # the problem statement
    answer: str  # the gold final answer


def read_problems(path: str) -> list[MathProblem]:
    problems = []
    for number, row in jsonl.records(path):
        text, answer = row.get("problem", row.get("question")), row.get("answer")
        if not isinstance(text, str) or not isinstance(answer, str | int | float):
            raise jsonl.InputError(
                f'{path}:{number}: expected "problem" (or "question") text and an "answer"'
            )
        problems.append(MathProblem(text, str(answer)))
    if not problems:
        raise jsonl.InputError(f"{path}: no problems")
    return problems


class ProblemStream:
    """This rank's share of each step's problems; `consumed_samples` counts all DP ranks'."""

    def __init__(
        self,
        problems: list[MathProblem],
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by DP {dp_size}")
        self.problems = problems
        self.global_batch = global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation)

    def _at(self, index: int) -> MathProblem:
        """The index-th problem of the endless sequence of shuffled epochs."""
        epoch, offset = divmod(index, len(self.problems))
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.problems), generator=gen).tolist())
        return self.problems[self._order[1][offset]]

    def __next__(self) -> list[MathProblem]:
        share = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * share
        self.consumed_samples += self.global_batch
        return [self._at(i) for i in range(first, first + share)]
