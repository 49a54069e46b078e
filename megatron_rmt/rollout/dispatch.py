"""Run one step's rollouts on whichever engine is configured, from the right ranks.

The embedded engine is collective (every rank of the replica runs the model). A remote service is
called by the replica's first rank only; the others receive its results. A service failure after
the client's own retries returns None: the step then proceeds NTP-only, and the trainer counts it.
"""

import logging

from megatron_rmt import parallel
from megatron_rmt.rollout.contract import RolloutEngine, RolloutRequest, RolloutResult

log = logging.getLogger(__name__)


def run_rollouts(
    engine: RolloutEngine, requests: list[RolloutRequest], rank_in_replica: int
) -> list[RolloutResult] | None:
    if engine.collective:
        return engine.generate(requests) if requests else []
    results = None
    if rank_in_replica == 0:
        try:
            results = engine.generate(requests) if requests else []
        except Exception as e:  # the run must outlive the rollout service
            log.warning("rollouts failed, this step trains NTP only: %s", e)
    return parallel.broadcast_object_in_replica(results)
