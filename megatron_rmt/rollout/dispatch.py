"""One step's rollouts on whichever engine is configured, from the right ranks, at the right time.

- A remote service is called by one rank per model-parallel replica, the talker: TP rank 0 of
  the last pipeline stage, where C is chosen. It sends each microbatch's requests as soon as that
  microbatch's loss_func has picked its positions, so the service samples while the rest of the
  NTP pass computes (the requests wait on HTTP in threads; the pass holds no lock they need).
  After the pass the talker waits for the rest and shares the results with its replica.
- The embedded engine is collective (every rank of the replica runs the model), so it samples
  after the NTP pass, when the model is free.
- Every rank builds the step's requests again after the pass from the broadcast problems, with
  the same function and per-problem seeds, so they are exactly the ones the talker sent.
- A request the service failed after the client's own retries (unreachable, or only invalid
  replies) has no result: the step trains without it (problems.served). If every request failed the
  step proceeds NTP-only, and the trainer counts it.
- `dropped` (requests without a result) and `invalid` (replies the engine rejected, for an
  engine that counts them in `invalid_replies` as the vLLM client does) are the same on every
  rank of the replica after `results`.
"""

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from megatron_rmt import parallel
from megatron_rmt.rollout.contract import RolloutEngine, RolloutRequest, RolloutResult

log = logging.getLogger(__name__)

# (problems, index of the first of them in the step) -> their requests. A problem is whatever
# the caller samples for: a chosen position (problems.Problem), a math problem (math_data).
MakeRequests = Callable[[list[Any], int], list[RolloutRequest]]


class StepRollouts:
    """The rollouts of one step: `submit` as C is chosen, `results` after the NTP pass."""

    def __init__(
        self, engine: RolloutEngine, talker: int, make_requests: MakeRequests, concurrency: int
    ):
        self.engine = engine
        self.talker = talker  # global rank that calls a remote engine for this replica
        self.make_requests = make_requests
        self.streaming = not engine.collective and dist.get_rank() == talker
        # One request per task: concurrency stays bounded however many microbatches there are.
        self.pool = ThreadPoolExecutor(concurrency) if self.streaming else None
        self.futures: list[Future] = []
        self.submitted = 0
        self._invalid_before = self._invalid_so_far()
        self.invalid = 0  # replies rejected this step, known after `results`
        self.dropped = 0  # requests that failed this step, known after `results`

    def submit(self, problems: list) -> None:
        """Last stage, after each microbatch's selection: the talker sends its requests now."""
        if not self.streaming:
            return
        for request in self.make_requests(problems, self.submitted):
            self.futures.append(self.pool.submit(self.engine.generate, [request]))
        self.submitted += len(problems)

    def results(self, requests: list[RolloutRequest]) -> list[RolloutResult | None] | None:
        """Every rank of the replica: the result of each of the step's `requests` (None for a
        request that failed), or None if all of them failed."""
        if self.engine.collective:
            return self.engine.generate(requests) if requests else []
        results = None
        if self.streaming:
            results = [_result_or_none(future) for future in self.futures]
            self.pool.shutdown()
            if results and all(r is None for r in results):
                log.warning("every rollout request failed, this step trains NTP only")
                results = None
        counts = (self._invalid_so_far() - self._invalid_before, len(self.futures))
        results, (self.invalid, sent) = parallel.broadcast_object_in_replica(
            (results, counts), self.talker
        )
        self.dropped = sent if results is None else sum(r is None for r in results)
        return results

    def _invalid_so_far(self) -> int:
        return getattr(self.engine, "invalid_replies", 0)  # engines that validate nothing: 0


def _result_or_none(future: Future) -> RolloutResult | None:
    try:
        return future.result()[0]
    except Exception as e:  # the run must outlive the rollout service
        log.warning("a rollout request failed, this step trains without it: %s", e)
        return None
