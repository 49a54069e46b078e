"""Save and resume training with megatron.core.dist_checkpointing.

A checkpoint is `{dir}/iter_{step:07d}/`: model and optimizer as sharded tensors (the model loads
at any TP/PP/DP; the distributed optimizer's state, sharded over DP, in Megatron-LM's default
`dp_reshardable` format, at the same TP/PP: change those with `--no-load-optim`), and a common part written once: scheduler, step (which drives B_t and p(t)), data
position (consumed samples) and the resolved config. Each rank's RNG states sit beside it and are
restored when the layout is unchanged (all randomness of the method is also seeded by step).

Loading runs no code from the checkpoint: the RNG files hold tensors and plain values only, and
every file is checked before megatron-core reads it (checkpoint_safety.py); a crafted file is
refused with its name. How to treat checkpoints from others: docs/checkpoints.md.

Writes are atomic: everything goes to `iter_N.tmp/`, which is renamed once every rank finished,
and only then does `latest_checkpointed_iteration.txt` (Megatron-LM's tracker name) move to it,
itself replaced atomically. A crash mid-save leaves the previous checkpoint as "latest".
"""

import contextlib
import inspect
import os
import random
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_rmt import config as config_mod
from megatron_rmt import parallel
from megatron_rmt.build import Trainable
from megatron_rmt.checkpoint_safety import CheckpointError, check_checkpoint_files, read_rng_file

TRACKER = "latest_checkpointed_iteration.txt"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class Progress:
    """What, besides tensors, a resumed run must continue from."""

    step: int = 0
    consumed_samples: int = 0
    totals: dict[str, int] = field(default_factory=dict)  # cumulative metrics (train.TOTALS)
    # One-step-ahead rollouts chosen before the checkpoint and not yet trained, per replica, as
    # plain values (ahead.RolloutQueue.checkpoint_state); None on-policy
    pending_rollouts: dict | None = None


@contextlib.contextmanager
def staged_dir(path: str):
    """Collective: yields `path.partial`, made afresh by rank 0, for every rank to write into;
    renamed to `path` once all ranks finished, removed if the body failed (nothing half-written
    is ever left at `path`)."""
    partial = path + ".partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    try:
        yield partial
        dist.barrier()
        if rank0:
            os.replace(partial, path)
        dist.barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int | None:
    try:
        with open(os.path.join(root, TRACKER)) as fh:
            return int(fh.read().strip())
    except FileNotFoundError:
        return None


def save(root: str, trainable: Trainable, progress: Progress, cfg, saves=None) -> str:
    """Write a checkpoint of every rank's state, then prune to `--keep-last-n-checkpoints`;
    returns its directory. With `saves` (async_save.AsyncSaves) the write continues in the
    background and the checkpoint is published when `saves` finalises it."""
    # Before the first optimizer step there is no optimizer state: such a checkpoint holds the
    # model only, and loading it starts a fresh optimizer.
    with_optimizer = progress.step > 0
    trainable.gather_params()  # a pending --overlap-param-gather (nothing if done already)
    state = _sharded_state(trainable, is_loading=False, with_optimizer=with_optimizer)
    state.update(
        scheduler=trainable.scheduler.state_dict(),
        progress=vars(progress).copy(),
        has_optimizer=with_optimizer,
    )
    keep = cfg.checkpoint.keep_last_n_checkpoints
    return _write(root, progress.step, state, cfg, with_rng=True, keep=keep, saves=saves)


def save_model(root: str, model, cfg) -> str:
    """A bare model stage (no DDP, no optimizer) as a step-0 checkpoint, as the HF converter
    writes it; the trainer's `--load` reads it like any other."""
    state = {
        "model": model.sharded_state_dict(),
        "progress": vars(Progress()),
        "has_optimizer": False,
    }
    return _write(root, 0, state, cfg, with_rng=False)


def load_model(root: str, model) -> None:
    """Load only the weights of the latest checkpoint under `root` into a bare model stage."""
    path = _latest_dir(root)
    parallel.agree(lambda: check_checkpoint_files(path), CheckpointError)
    loaded = dist_checkpointing.load({"model": model_state_to_load(model, path)}, path)
    load_model_state(model, loaded["model"])


def _write(root: str, step: int, state: dict, cfg, with_rng: bool, keep=None, saves=None) -> str:
    """Every rank writes its shards into iter_N.tmp; then (at once, or when `saves` finalises
    the background write) rank 0 renames it, moves the tracker and prunes."""
    if saves is not None:
        saves.finish()  # the previous save is published before this one starts
    final = iteration_dir(root, step)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    _writer_queue_dies_with_us()
    in_background = _async_save_args() if saves is not None else {}
    request = dist_checkpointing.save(
        {**state, "config": config_mod.to_yaml(cfg)}, tmp, **in_background
    )
    if with_rng:
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank:05d}.pt"))

    def publish():
        dist.barrier()
        if rank == 0:
            with open(os.path.join(tmp, "config.yaml"), "w") as fh:
                fh.write(config_mod.to_yaml(cfg))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_tracker(root, step)
            if keep:
                prune(root, keep)
        dist.barrier()

    if saves is None:
        publish()
    else:
        saves.schedule(request, publish)
    return final


def _async_save_args() -> dict:
    """`dist_checkpointing.save` arguments for a background write through megatron-core's own
    `AsyncCallsQueue` (async_save.py). 0.19 added `async_strategy`, defaulting to NVIDIA
    Resiliency Extension's queue ("nvrx", a package this project does not use): ask for "mcore"
    where the argument exists."""
    args = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        args["async_strategy"] = "mcore"
    return args


def _latest_dir(root: str) -> str:
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root}: no {TRACKER}; not a checkpoint directory")
    return iteration_dir(root, step)


def load(root: str, trainable: Trainable, load_optimizer: bool = True) -> Progress:
    """Load the latest checkpoint under `root` into `trainable`; returns where to continue."""
    path = _latest_dir(root)
    parallel.agree(lambda: check_checkpoint_files(path), CheckpointError)
    common = dist_checkpointing.load_common_state_dict(path)
    with_optimizer = load_optimizer and common.get("has_optimizer", False)
    if with_optimizer:
        _start_empty_adam_state(trainable.optimizer)
    wanted = _sharded_state(trainable, True, with_optimizer)
    wanted["model"] = model_state_to_load(trainable.model[0].module, path, wanted["model"])
    loaded = dist_checkpointing.load(wanted, path)
    load_model_state(trainable.model[0].module, loaded["model"])
    if not with_optimizer:
        trainable.optimizer.reload_model_params()
        return Progress()
    with torch.no_grad():  # megatron-core copies into the main params in place
        trainable.optimizer.load_state_dict(loaded["optimizer"])
    trainable.scheduler.load_state_dict(common["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt")
    saved_rng = parallel.agree(lambda: read_rng_file(rng_file), CheckpointError)
    if saved_rng is not None:  # checkpoints without RNG files (converted ones) keep the seed's
        _restore_rng(saved_rng)
    return Progress(**common["progress"])


def model_state_to_load(model, path: str, sharded: dict | None = None) -> dict:
    """The model's sharded state dict, less the `_extra_state` entries the checkpoint lacks.

    Transformer Engine modules carry `_extra_state` (FP8 metadata) that a checkpoint written
    with Megatron's local spec (e.g. converted on CPU) does not hold for every module, e.g. TE's
    QK-norms; their weights have the same keys in both specs. Such an entry is left out of the
    load, so the module keeps its fresh extra state; everything else must be present."""
    sharded = model.sharded_state_dict() if sharded is None else sharded
    present = load_sharded_metadata(path).keys()
    return {
        k: v
        for k, v in sharded.items()
        if not k.endswith("_extra_state") or getattr(v, "key", k) in present
    }


def load_model_state(model, state: dict) -> None:
    """`load_state_dict`, strict except for `_extra_state` entries the checkpoint lacked."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if wrong:
        raise RuntimeError(f"checkpoint does not match the model: {wrong[:10]}")


def _start_empty_adam_state(optimizer) -> None:
    """Megatron's distributed optimizer describes its state for loading by reading every
    parameter's Adam `step`, which torch's Adam (no apex / TE, e.g. on CPU) creates only at its
    first step: give a never-stepped one the state that step starts from (step 0, zero moments);
    the load then overwrites it."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(p.data),
                        exp_avg_sq=torch.zeros_like(p.data),
                    )


def _sharded_state(trainable: Trainable, is_loading: bool, with_optimizer: bool) -> dict:
    model_sd = trainable.model[0].module.sharded_state_dict()
    if not with_optimizer:
        return {"model": model_sd}
    optim_sd = trainable.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA
    )
    return {"model": model_sd, "optimizer": optim_sd}


def _layout() -> list[int]:
    return [
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        dist.get_world_size(),
    ]


def _rng_state() -> dict:
    """This rank's random streams as tensors and plain values, so that the file loads with
    `weights_only=True`: Python's and NumPy's Mersenne Twister keys as int64 tensors, torch's
    generator states as the uint8 tensors torch gives."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, np_gauss = np.random.get_state()
    state = {
        "layout": _layout(),
        "python": {"version": version, "keys": torch.tensor(keys), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(saved: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if list(saved["layout"]) != _layout():
        return  # another TP/PP/DP layout: the per-rank streams do not correspond
    py, npy = saved["python"], saved["numpy"]
    if isinstance(py, tuple):  # an earlier release's file: the states as Python gives them
        random.setstate(py)
        np.random.set_state(npy)
    else:
        random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss"]))
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(saved["torch"])
    get_cuda_rng_tracker().set_states(saved["tracker"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


_MANAGERS = []  # keeps the results queue's manager alive while this process lives


def _writer_queue_dies_with_us() -> None:
    """megatron-core's filesystem writer hands its results through a queue served by a
    multiprocessing manager, a process it starts on the first save that would outlive a
    `kill -9` of the trainer. Serve that queue from a manager of ours, which the kernel kills
    with this process (PR_SET_PDEATHSIG, Linux only). Nothing to do on releases without that
    queue. Call it from the main thread: the kernel sends that signal when the creating thread
    ends."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not sys.platform.startswith("linux"):
        return
    if getattr(filesystem_async, "_results_queue", True) is not None:
        return
    from multiprocessing.managers import SyncManager

    from torch import multiprocessing as mp

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()


def die_with_parent(parent_pid: int) -> None:
    """In a child process: SIGKILL it when its parent exits, however the parent ends."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(1)


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` finished checkpoints under `root` (`--keep-last-n-
    checkpoints`); returns the deleted directories. Never the tracker's latest, nor one being
    written (`.tmp`, `.partial`). Called by rank 0 when a save is published."""
    latest = latest_step(root)
    steps = sorted(
        int(name[len("iter_") :])
        for name in os.listdir(root)
        if name.startswith("iter_") and name[len("iter_") :].isdigit()
    )
    doomed = [s for s in steps[: max(len(steps) - keep, 0)] if s != latest]
    for s in doomed:
        shutil.rmtree(iteration_dir(root, s))
    return [iteration_dir(root, s) for s in doomed]


def _write_tracker(root: str, step: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(str(step))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
