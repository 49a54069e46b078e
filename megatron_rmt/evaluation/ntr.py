"""Next-token reasoning (NTR) on an evaluation set, through the trainer's own rollout path.

Each position becomes the trainer's problem (`problems.Problem`): the prompt of the run's
template, with the budget sentence when a budget is given, G samples from the rollout engine
(embedded or vLLM, via `dispatch.StepRollouts` so the right ranks call it), and every response
read back exactly as the trainer reads it (`problems.score`): the template's response prefix plus
the sampled text, the last `\\boxed{}` after `</think>`, matched to the true token after
whitespace normalisation. pass@1 is the share of matching samples.

Deliberate choices:
- Positions go in batches of `batch_size` (progress is reported per batch); request seeds follow
  the position's index in the whole set (`indices`), so results depend neither on the batch
  size nor on how data-parallel replicas split the set.
- A rollout service that fails after its retries fails the evaluation (the trainer would go
  NTP-only for a step; an evaluation with holes would be silently wrong).
"""

from collections.abc import Callable

import torch

from megatron_rmt import problems
from megatron_rmt.evaluation.evalset import EvalPosition
from megatron_rmt.rollout.contract import RolloutEngine
from megatron_rmt.rollout.dispatch import StepRollouts


def as_problem(p: EvalPosition) -> problems.Problem:
    return problems.Problem(p.prefix_ids, p.target_id, p.continuation_ids, p.entropy, p.level)


def ntr_scores(
    positions: list[EvalPosition],
    indices: list[int],
    engine: RolloutEngine,
    talker: int,
    tokenizer,
    template,
    budget: int | None,
    rmt,
    seed: int,
    batch_size: int,
    concurrency: int,
    on_batch: Callable[[int], None] | None = None,
) -> problems.Scored:
    """Every position's G responses scored; `indices` are the positions' indices in the whole
    set (they seed the sampling); `rmt` gives G (group_size), the sampling settings and the cap.
    Collective over the model-parallel replica. `on_batch(n)` after each n positions."""
    chosen = [as_problem(p) for p in positions]
    parts = []
    for first in range(0, len(chosen), batch_size):
        batch = chosen[first : first + batch_size]

        def make(some, start, first=first):  # one problem at a time: seeded by its set index
            return [
                request
                for k, problem in enumerate(some)
                for request in problems.make_requests(
                    [problem], tokenizer, template, budget, rmt, seed, indices[first + start + k]
                )
            ]

        rollouts = StepRollouts(engine, talker, make, concurrency)
        rollouts.submit(batch)  # only a remote engine's talker sends anything here
        requests = make(batch, 0)
        results = rollouts.results(requests)
        if results is None or None in results:  # every position must be scored
            raise RuntimeError("the rollout service failed; the evaluation cannot go on")
        groups = problems.served(batch, requests, results)
        parts.append(problems.score(groups, tokenizer, template, budget, rmt, False))
        if on_batch is not None:
            on_batch(len(batch))
    return problems.Scored(
        *(torch.cat([getattr(s, f) for s in parts]) for f in problems.Scored.__dataclass_fields__)
    )
