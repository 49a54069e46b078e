"""Which chosen positions a step's RL term trains on: its own (on-policy, the paper's step) or,
with `--rollout-ahead 1`, those the step before chose (one-step-ahead rollouts).

One-step-ahead: the positions C_t that step t's NTP pass chooses are masked out of step t's NTP
loss as always, and their prompts carry step t's budget B_t; a rollout service samples them
while the trainer finishes step t (the RL term of C_{t-1}, the optimizer step, the weight sync)
and runs step t+1's NTP pass. Step t+1 then waits only for what is still missing of C_t, scores
it with B_t (the length reward of the budget its prompts asked for) and trains on it, with the
log-probs the service returned (`--tis-cap` corrects for the version between, losses.py).

Deliberate choices:
- The embedded engine is collective (it runs the trainer's own model), so it cannot sample
  while the trainer computes: it samples C_t after step t's NTP pass, at step t's weights, as
  on-policy; only the RL gradient moves to step t+1. The data flow is the service's, and
  deterministic, which the tests use.
- The first step has no RL term (nothing was chosen before it). The last step's positions are
  sampled and kept, not trained: the run's last checkpoint holds them, so a run continued
  from it (a larger --train-iters) trains them in its next step exactly as an uninterrupted
  run would; without a checkpoint they are dropped, and the run's last line says how many.
- Weight versions: a step trains at version t; a result sampled from version v is used when
  t - v <= k - 1 + ahead (k = --weight-sync-interval: one version behind at most, with k = 1
  and one step ahead), else refused and counted (`rollout_stale`); a version newer than the
  trainer's is a bug and stops the run.
- A checkpoint taken with rollouts in flight waits for them and stores problems, requests,
  results and budget (plain values, per data-parallel replica) in the checkpoint's common
  state (`Progress.pending_rollouts`); a run resumed from it continues with them, so it is
  bit-identical to the uninterrupted run. Resumed on another number of replicas, the pending
  positions cannot be given back to the replicas that chose them: they are dropped, with a
  warning.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rmt import problems
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.rollout.dispatch import StepRollouts

log = logging.getLogger(__name__)


@dataclass
class Chosen:
    """One step's chosen positions, their requests and, once `collect`ed, the results."""

    step: int
    problems: list[problems.Problem]
    requests: list[RolloutRequest]
    budget: int | None  # B_t of the step that chose them (None without DTB)
    rollouts: StepRollouts | None  # in flight until collected
    results: list[RolloutResult | None] | None = None
    failed: bool = False  # every request failed: no RL term from these positions
    invalid: int = 0
    dropped: int = 0

    def collect(self) -> None:
        """Every rank of the replica: wait for the results (at once for a collective engine,
        which samples here); nothing to do once collected."""
        if self.rollouts is None:
            return
        self.results = self.rollouts.results(self.requests)
        self.failed = self.results is None
        self.invalid, self.dropped = self.rollouts.invalid, self.rollouts.dropped
        self.rollouts = None


@dataclass(frozen=True)
class Source:
    """What one step's RL term trains on, and what the metrics say about it."""

    step: int  # the step whose NTP pass chose the positions (-1: no RL term this step)
    groups: list[problems.Group]  # served and fresh enough
    budget: int | None  # the budget to score them with (that step's)
    failed: bool = False
    invalid: int = 0
    dropped: int = 0
    stale: int = 0  # results refused as sampled too many versions behind
    waited: float = 0.0  # seconds this step waited for rollouts after its NTP pass


class RolloutQueue:
    """The chosen positions between their step's NTP pass and the RL term that trains them."""

    def __init__(self, ahead: int, sync_interval: int, pending: Chosen | None = None):
        self.ahead = ahead  # 0: on-policy; 1: one step ahead
        self.max_lag = sync_interval - 1 + ahead
        self.pending = pending

    def exchange(self, t: int, chosen: Chosen) -> Source:
        """After step t's NTP pass, every rank: step t's `chosen` positions join; returns those
        whose RL term trains in step t (step t's own, or step t-1's one step ahead)."""
        start = time.perf_counter()
        if self.ahead == 0 or chosen.rollouts.engine.collective:
            chosen.collect()  # on-policy, or the embedded engine: sampled now
        if self.ahead == 0:
            source = chosen
        else:
            source, self.pending = self.pending, chosen
        if source is None:  # the first step one ahead: nothing chosen before it
            return Source(-1, [], chosen.budget, waited=time.perf_counter() - start)
        source.collect()  # one ahead: what was sampled while this step's NTP pass ran
        groups = problems.served(source.problems, source.requests, source.results)
        groups, stale = fresh(groups, t, self.max_lag)
        return Source(
            step=source.step, groups=groups, budget=source.budget, failed=source.failed,
            invalid=source.invalid, dropped=source.dropped, stale=stale,
            waited=time.perf_counter() - start,
        )  # fmt: skip

    def drain(self) -> int:
        """End of the run, every rank: wait for what is still in flight; returns how many
        positions were sampled but never trained."""
        if self.pending is None:
            return 0
        self.pending.collect()
        return len(self.pending.problems)

    def checkpoint_state(self) -> dict | None:
        """Collective over the data-parallel group: every replica's pending positions with their
        results (waited for), as plain values for the checkpoint's common state."""
        if self.ahead == 0:
            return None
        mine = None
        if self.pending is not None:
            self.pending.collect()
            mine = _to_plain(self.pending)
        replicas = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(replicas, mine, group=ps.get_data_parallel_group())
        return {"replicas": replicas}

    @classmethod
    def of(cls, cfg, pending_state: dict | None, dp_rank: int, dp_size: int) -> "RolloutQueue":
        """The run's queue, with the pending positions of a resumed checkpoint."""
        pending = None
        if pending_state is None or not any(pending_state["replicas"]):
            pass  # nothing in flight when it was saved
        elif not cfg.rollout.rollout_ahead:
            log.warning("the checkpoint's pending one-step-ahead rollouts are dropped (on-policy)")
        else:
            replicas = pending_state["replicas"]
            if len(replicas) == dp_size:
                pending = _from_plain(replicas[dp_rank])
            else:
                log.warning(
                    "the checkpoint's pending rollouts belong to %d data-parallel replicas, this "
                    "run has %d: they are dropped", len(replicas), dp_size,
                )  # fmt: skip
        return cls(cfg.rollout.rollout_ahead, cfg.rollout.weight_sync_interval, pending)


def fresh(groups: list[problems.Group], t: int, max_lag: int) -> tuple[list, int]:
    """The groups whose results were sampled at most `max_lag` versions before the trainer's v t,
    and how many were refused. A result from a version after t cannot be and stops the run."""
    kept = []
    for g in groups:
        version = g.result.weight_version
        if version > t:
            raise RuntimeError(f"rollout from weights v{version}, trainer is only at v{t}")
        if t - version <= max_lag:
            kept.append(g)
    return kept, len(groups) - len(kept)


def _to_plain(chosen: Chosen) -> dict:
    results = chosen.results
    return {
        "step": chosen.step,
        "budget": chosen.budget,
        "problems": [dataclasses.asdict(p) for p in chosen.problems],
        "requests": [dataclasses.asdict(r) for r in chosen.requests],
        "results": None if results is None else [r and dataclasses.asdict(r) for r in results],
        "counts": [chosen.failed, chosen.invalid, chosen.dropped],
    }


def _from_plain(state: dict | None) -> Chosen | None:
    if state is None:
        return None
    results = state["results"]
    failed, invalid, dropped = state["counts"]
    return Chosen(
        step=state["step"],
        problems=[problems.Problem(**p) for p in state["problems"]],
        requests=[RolloutRequest(**r) for r in state["requests"]],
        budget=state["budget"],
        rollouts=None,
        results=None if results is None else [r and RolloutResult(**r) for r in results],
        failed=failed, invalid=invalid, dropped=dropped,
    )  # fmt: skip
