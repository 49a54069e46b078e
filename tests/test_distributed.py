"""tests/distributed.py itself: a dead or hung worker fails the caller within a bound, naming the
ranks' exit codes, instead of hanging the suite (its other ranks wait in a collective forever)."""

import os
import re
import signal
import time

import pytest
import torch.distributed as dist
from distributed import spawn

# Generous: starting two workers alone can take a minute on a loaded 2-core machine. Without the
# harness's checks these calls never return.
BOUND_S = 180


def die_on_rank_one(how: str) -> int:
    if dist.get_rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    dist.barrier()  # rank 0 waits here for the dead rank: only the harness can end it
    return 0


def raise_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank one's assertion")
    dist.barrier()
    return 0


def sleep_forever() -> None:
    while True:
        time.sleep(1)


def ranks_that_stop_agreeing() -> None:
    """Rank 1 waits in a collective rank 0 never joins (rank 0 took the other branch of a
    decision the ranks should have agreed on, and is busy elsewhere)."""
    if dist.get_rank() == 1:
        dist.barrier()
    else:
        sleep_forever()


@pytest.mark.parametrize("how, code", [("kill", -signal.SIGKILL), ("exit", 3)])
def test_a_worker_that_dies_fails_the_call_with_its_exit_code(how, code):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited without reporting") as raised:
        spawn(die_on_rank_one, 2, args=(how,))
    assert time.monotonic() - start < BOUND_S
    assert f"rank 1: exit code {code}" in str(raised.value)
    assert "rank 0: exit code" in str(raised.value)  # the waiting rank was ended, not left behind


def test_a_failing_rank_ends_its_waiting_peers():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank one's assertion") as raised:
        spawn(raise_on_rank_one, 2)
    assert time.monotonic() - start < BOUND_S
    # Rank 0 is ended by the harness, or first learns from gloo that its peer is gone and
    # reports that itself: either way the call returned, and rank 0 is not left behind.
    assert re.search(rf"rank 0: exit code ({-signal.SIGTERM}|0)\b", str(raised.value))


def test_a_hung_worker_fails_the_call_at_its_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[0\] had not reported"):
        spawn(sleep_forever, 1, timeout=3)
    assert time.monotonic() - start < BOUND_S


def test_ranks_that_stop_agreeing_fail_with_where_each_one_waits():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] had not reported") as raised:
        spawn(ranks_that_stop_agreeing, 2, timeout=5)
    assert time.monotonic() - start < BOUND_S
    message = str(raised.value)
    assert "5 s after every rank started" in message
    stacks = dict(re.findall(r"rank (\d) had not reported; its stacks:\n(.*?)(?=\nrank \d |$)",
                             message, re.S))  # fmt: skip
    assert "in barrier" in stacks["1"] and "in ranks_that_stop_agreeing" in stacks["1"], message
    assert "in sleep_forever" in stacks["0"] and "barrier" not in stacks["0"], message
