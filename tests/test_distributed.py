"""tests/distributed.py itself: a dead or hung worker fails the caller within a bound, naming the
ranks' exit codes, instead of hanging the suite (its other ranks wait in a collective forever)."""

import os
import signal
import time

import pytest
import torch.distributed as dist
from distributed import spawn

BOUND_S = 90  # generous for a loaded 2-core machine; without the checks these calls never return


def die_on_rank_one(how: str) -> int:
    if dist.get_rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    dist.barrier()  # rank 0 waits here for the dead rank: only the harness can end it
    return 0


def sleep_forever() -> None:
    while True:
        time.sleep(1)


def rank_value() -> int:
    return dist.get_rank() * 10


@pytest.mark.parametrize("how, code", [("kill", -signal.SIGKILL), ("exit", 3)])
def test_a_worker_that_dies_fails_the_call_with_its_exit_code(how, code):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited without reporting") as raised:
        spawn(die_on_rank_one, 2, args=(how,))
    assert time.monotonic() - start < BOUND_S
    assert f"rank 1: exit code {code}" in str(raised.value)
    assert "rank 0: exit code" in str(raised.value)  # the waiting rank was ended, not left behind


def test_a_hung_worker_fails_the_call_at_its_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[0\] had not reported"):
        spawn(sleep_forever, 1, timeout=3)
    assert time.monotonic() - start < BOUND_S


def test_results_come_back_in_rank_order():
    assert spawn(rank_value, 2) == [0, 10]
