"""Run a test function in several gloo processes with Megatron's parallel groups set up.

Megatron-Core's own test helper initialises NCCL; this one works on a CPU-only machine. Each worker
is a fresh interpreter (spawn), so `fn` must be importable: a module-level function of a test file.
"""

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def spawn(fn, world_size: int, *, tp: int = 1, pp: int = 1, args: tuple = ()) -> list:
    """Call fn(*args) on `world_size` ranks after megatron_rmt.parallel.init(tp, pp); return the
    per-rank results in rank order. A worker's exception fails the caller with its traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, tp, pp, fn, args, queue))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in procs:
        rank, ok, value = queue.get()
        if ok:
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _worker(rank, world_size, port, tp, pp, fn, args, queue):
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
        queue.put((rank, True, pickle.dumps(value)))  # plain bytes: no shared memory
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_rmt import parallel

        parallel.destroy()
