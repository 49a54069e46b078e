"""Run a test function in several gloo processes with Megatron's parallel groups set up.

Megatron-Core's own test helper initialises NCCL; this one works on a CPU-only machine. Each worker
is a fresh interpreter (spawn), so `fn` must be importable: a module-level function of a test file.

A worker that dies without reporting (killed by a signal, `os._exit`) or a run that outlives its
`timeout` fails the caller within seconds of noticing: the other workers are killed, and the error
names every rank's state and exit code, so a broken worker never hangs the suite. Each rank that
had not reported is first asked for its Python stacks (faulthandler on SIGUSR1, every thread):
the error shows where each hung rank waits (e.g. the collective its peers never joined), so a
test whose ranks stop agreeing fails by a message, not only by the clock. Tests that must end
quickly pass a `timeout` of their own.
"""

import faulthandler
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

TIMEOUT_S = 300.0  # fn's run; the slowest distributed test takes about a minute on 2 cores
STARTUP_S = 300.0  # until every rank is in fn (imports, process groups), apart from `timeout`
GRACE_S = 10.0  # after one rank failed, how long the others get to report before they are killed
DUMP_S = 3.0  # how long a rank that had not reported gets to write its stacks


def spawn(
    fn, world_size: int, *, tp: int = 1, pp: int = 1, args: tuple = (), timeout: float = TIMEOUT_S
) -> list:
    """Call fn(*args) on `world_size` ranks after megatron_rmt.parallel.init(tp, pp); return the
    per-rank results in rank order. A worker's exception fails the caller with its traceback; a
    worker that exits without reporting, or that has not reported `timeout` seconds after every
    rank entered fn (start-up, which a loaded machine slows down, has its own STARTUP_S), fails it
    too, with the stacks of the ranks that had not reported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    stacks = tempfile.mkdtemp(prefix="spawn-stacks-")
    for rank in range(world_size):
        receiver, sender = ctx.Pipe(duplex=False)
        dump = os.path.join(stacks, f"rank{rank}")
        procs.append(
            ctx.Process(
                target=_worker, args=(rank, world_size, port, tp, pp, fn, args, sender, dump)
            )
        )
        conns.append(receiver)
        procs[-1].start()
        sender.close()  # the child holds the only writer: its death reads as end-of-file here
    results, errors, pending = {}, [], set(range(world_size))
    try:
        _collect(procs, conns, timeout, results, errors, pending)
        errors += _stacks_of(procs, pending, stacks)
    finally:
        _stop(procs, pending)
        shutil.rmtree(stacks, ignore_errors=True)
    if errors:
        states = ", ".join(f"rank {r}: exit code {p.exitcode}" for r, p in enumerate(procs))
        raise RuntimeError(f"distributed worker failed ({states})\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _collect(procs, conns, timeout: float, results: dict, errors: list, pending: set) -> None:
    """Read each rank's report (into `results` or `errors`, removing it from `pending`) until all
    are in, one rank failed (plus a grace for the others to report too), or the deadline passed
    (STARTUP_S until every rank said it entered fn, then `timeout` from then); a rank that ends
    without a report counts as failed."""
    waiting = set(pending)  # ranks not yet in fn
    deadline = time.monotonic() + STARTUP_S
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            when = f"{timeout:.0f} s after every rank started" if not waiting else (
                f"{STARTUP_S:.0f} s after the start, ranks {sorted(waiting)} not yet started"
            )  # fmt: skip
            errors.append(f"ranks {sorted(pending)} had not reported when the wait ended ({when})")
            break
        for conn in wait([conns[r] for r in pending], timeout=left):
            rank = conns.index(conn)
            try:
                ok, value = conn.recv()
            except EOFError:
                pending.discard(rank)
                procs[rank].join(timeout=5)
                errors.append(
                    f"rank {rank}: exited without reporting (exit code {procs[rank].exitcode})"
                )
                continue
            if ok is None:  # the rank entered fn
                waiting.discard(rank)
                if not waiting and not errors:
                    deadline = time.monotonic() + timeout
                continue
            pending.discard(rank)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
            if errors:  # the rest may be stuck in a collective waiting for the failed rank
                deadline = min(deadline, time.monotonic() + GRACE_S)


def _stacks_of(procs, pending: set, stacks: str) -> list[str]:
    """Where each live rank that had not reported is: its threads' Python stacks (the worker's
    faulthandler writes them on SIGUSR1). A rank that cannot answer says so."""
    asked = []
    for rank in sorted(pending):
        if procs[rank].is_alive():
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
                asked.append(rank)
            except ProcessLookupError:
                pass
    out, deadline = [], time.monotonic() + DUMP_S
    for rank in asked:
        path, size = os.path.join(stacks, f"rank{rank}"), 0
        while time.monotonic() < deadline and (size == 0 or _size(path) != size):
            size = _size(path)  # written at once: done when it stops growing
            time.sleep(0.2)
        text = ""
        if os.path.exists(path):  # not before the worker started (then SIGUSR1 ended it)
            with open(path) as fh:
                text = fh.read().strip()
        out.append(f"rank {rank} had not reported; its stacks:\n{text or '(no answer)'}")
    return out


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


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


def _worker(rank, world_size, port, tp, pp, fn, args, conn, dump):
    stacks = open(dump, "w")  # noqa: SIM115 (open for the process's life: faulthandler writes it)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
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
        conn.send((None, None))  # started: the caller's `timeout` runs from here
        value = fn(*args)
        conn.send((True, pickle.dumps(value)))  # plain bytes: no shared memory
    except BaseException:  # report every failure, including assertion errors, to the parent
        conn.send((False, traceback.format_exc()))
    finally:
        from megatron_rmt import parallel

        parallel.destroy()
