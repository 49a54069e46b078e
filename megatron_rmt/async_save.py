"""`--async-save`: checkpoint writes in the background with megatron-core's async path.

`checkpoint.save` stages the state (the common part and the RNG files are written at once; the
sharded tensors go to a writer process forked by megatron-core's `AsyncCallsQueue`, which holds
them as they were at the fork) and returns. What makes the checkpoint visible (rename of
`iter_N.tmp`, the tracker, keep-last-n pruning) is the request's finalize step, which megatron
runs on every rank together once every rank's writer is done: the tracker only ever names a
complete checkpoint.

A pending save is finalised before the next one starts (`checkpoint.save` waits), polled after
every step, and waited for when training ends. After an exception nothing is finalised (a
finalize is collective and the other ranks may never reach it): the save stays an unpublished
`.tmp` and the tracker names the previous checkpoint. The writer process is killed with the
trainer (checkpoint.die_with_parent), so it never outlives a killed run.
"""

import functools
import os

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_rmt.checkpoint import die_with_parent


class AsyncSaves:
    """The trainer's queue of background checkpoint writes. Every method is collective."""

    def __init__(self):
        self.queue = AsyncCallsQueue()

    def schedule(self, request, publish) -> None:
        """Start writing `request` (from `dist_checkpointing.save(..., async_sharded_save=True)`);
        `publish()` runs on every rank once all ranks' writes are done."""
        request.add_finalize_fn(publish)
        if request.async_fn is not None:
            writer = functools.partial(_write_then_exit, os.getpid(), request.async_fn)
            request = request._replace(async_fn=writer)
        self.queue.schedule_async_request(request)

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def finish(self) -> None:
        """Wait for every pending write and publish it."""
        self.queue.maybe_finalize_async_calls(blocking=True)

    def poll(self) -> None:
        """Publish the writes that are done on every rank; returns at once otherwise."""
        if self.pending():
            self.queue.maybe_finalize_async_calls(blocking=False)


def _write_then_exit(parent_pid: int, write, *args, **kwargs) -> None:
    die_with_parent(parent_pid)
    write(*args, **kwargs)
