"""Run a test function in several gloo processes with Megatron's parallel groups set up.

Megatron-Core's own test helper initialises NCCL; this one works on a CPU-only machine. Each worker
is a fresh interpreter (spawn), so `fn` must be importable: a module-level function of a test file.

A worker that dies without reporting (killed by a signal, `os._exit`) or a run that outlives its
`timeout` fails the caller within seconds of noticing: the other workers are killed, and the error
names every rank's state and exit code, so a broken worker never hangs the suite.
"""

import os
import pickle
import socket
import time
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

TIMEOUT_S = 300.0  # the whole run; the slowest distributed test takes about a minute on 2 cores
GRACE_S = 10.0  # after one rank failed, how long the others get to report before they are killed


def spawn(
    fn, world_size: int, *, tp: int = 1, pp: int = 1, args: tuple = (), timeout: float = TIMEOUT_S
) -> list:
    """Call fn(*args) on `world_size` ranks after megatron_rmt.parallel.init(tp, pp); return the
    per-rank results in rank order. A worker's exception fails the caller with its traceback; a
    worker that exits without reporting, or a run longer than `timeout` seconds, fails it too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(world_size):
        receiver, sender = ctx.Pipe(duplex=False)
        procs.append(
            ctx.Process(target=_worker, args=(rank, world_size, port, tp, pp, fn, args, sender))
        )
        conns.append(receiver)
        procs[-1].start()
        sender.close()  # the child holds the only writer: its death reads as end-of-file here
    results, errors, pending = {}, [], set(range(world_size))
    try:
        _collect(procs, conns, time.monotonic() + timeout, results, errors, pending)
    finally:
        _stop(procs, pending)
    if errors:
        states = ", ".join(f"rank {r}: exit code {p.exitcode}" for r, p in enumerate(procs))
        raise RuntimeError(f"distributed worker failed ({states})\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _collect(procs, conns, deadline: float, results: dict, errors: list, pending: set) -> None:
    """Read each rank's report (into `results` or `errors`, removing it from `pending`) until all
    are in, one rank failed (plus a grace for the others to report too), or the deadline passed;
    a rank that ends without a report counts as failed."""
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            errors.append(f"ranks {sorted(pending)} had not reported when the wait ended")
            break
        for conn in wait([conns[r] for r in pending], timeout=left):
            rank = conns.index(conn)
            pending.discard(rank)
            try:
                ok, value = conn.recv()
            except EOFError:
                procs[rank].join(timeout=5)
                errors.append(
                    f"rank {rank}: exited without reporting (exit code {procs[rank].exitcode})"
                )
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
            if errors:  # the rest may be stuck in a collective waiting for the failed rank
                deadline = min(deadline, time.monotonic() + GRACE_S)


def _stop(procs, pending: set) -> None:
    """Let the workers that reported exit (a short wait); terminate, then kill, the rest."""
    deadline = time.monotonic() + GRACE_S
    for rank, p in enumerate(procs):
        if rank not in pending:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def _worker(rank, world_size, port, tp, pp, fn, args, conn):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        from megatron_rmt import parallel

        torch.set_num_threads(1)  # ranks share 2 cores: oversubscribed OpenMP is many times slower
        parallel.init(tp=tp, pp=pp)
        value = fn(*args)
        conn.send((True, pickle.dumps(value)))  # plain bytes: no shared memory
    except BaseException:  # report every failure, including assertion errors, to the parent
        conn.send((False, traceback.format_exc()))
    finally:
        from megatron_rmt import parallel

        parallel.destroy()
