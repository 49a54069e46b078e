"""`--async-save`: checkpoints written in the background are published only once complete on
every rank, the run's end publishes the last one, and resuming from them gives the same state as
from synchronous saves."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import rl_groups
import torch
from conftest import ROOT
from distributed import spawn
from test_hardening_state import _alive, _survivors
from test_overlap_param_gather import _params
from test_scale_features import _cfg, _fresh, _groups, _ntp_batch
from test_train import _flags, _read, _train

from megatron_rmt import checkpoint, parallel, step
from megatron_rmt.async_save import AsyncSaves
from megatron_rmt.config import CheckpointConfig
from megatron_rmt.selection import Selector


def save_every_step(root, in_background, distributed_optimizer=False):
    """Three DP 2 steps, each saved; returns what the tracker and the
    directory showed right after each save call, the tracker at the end, and whether the
    parameters and optimizer state loaded from the last checkpoint equal the trainer's."""
    cfg = _cfg(1, parallel_kw={"use_distributed_optimizer": distributed_optimizer})
    cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(save=root, async_save=in_background))
    trainable = _fresh(cfg)
    saves = AsyncSaves() if in_background else None
    rank = parallel.layout_of_this_rank().dp_rank
    selector = Selector(None, (1.0, 0.0, 0.0), 1, (0.5, 1.0, 1.5), 0, 1, 0)
    seen = []
    for t in range(3):
        trainable.zero_grads()
        step.ntp_pass(trainable, [_ntp_batch(2 * t + rank)], selector, 0.1, 64)
        rl = rl_groups.rows(*_groups(t + 10 * rank), pad_id=0)
        step.rl_pass(trainable, rl, 40.0, rl_groups.settings())
        trainable.optimizer_step()
        checkpoint.save(root, trainable, checkpoint.Progress(step=t + 1), cfg, saves)
        seen.append(
            (checkpoint.latest_step(root), os.path.isdir(checkpoint.iteration_dir(root, t + 1)))
        )
    if saves is not None:
        saves.finish()
    resumed = _fresh(cfg)
    progress = checkpoint.load(root, resumed)
    main = [g["params"][0].detach().clone() for g in trainable.optimizer.param_groups]
    main_resumed = [g["params"][0].detach() for g in resumed.optimizer.param_groups]
    moments = [_adam_state(trainable), _adam_state(resumed)]
    same_state = (
        torch.equal(_params(resumed), _params(trainable))
        and all(torch.equal(a, b) for a, b in zip(main, main_resumed, strict=True))
        and len(moments[0]) > 0
        and all(torch.equal(a, b) for a, b in zip(*moments, strict=True))
    )
    return seen, checkpoint.latest_step(root), progress.step, same_state


def _adam_state(trainable) -> list[torch.Tensor]:
    """This rank's Adam moments (its shard with the distributed optimizer), in a fixed order."""
    inner = getattr(trainable.optimizer, "optimizer", trainable.optimizer)
    return [
        state[key].detach().clone()
        for group in inner.param_groups
        for p in group["params"]
        for state in [inner.state[p]]
        for key in ("exp_avg", "exp_avg_sq")
        if key in state
    ]


def test_the_distributed_optimizer_saves_and_resumes_at_dp2(tmp_path):
    """DP 2 with the optimizer state sharded over DP (the 14B configs' setting): the checkpoint
    holds every rank's shard and a resume restores it exactly."""
    for seen, latest, resumed_step, same in spawn(
        save_every_step, 2, args=(str(tmp_path / "ckpt"), False, True)
    ):
        assert seen == [(1, True), (2, True), (3, True)]
        assert (latest, resumed_step, same) == (3, 3, True)


@pytest.mark.slow
def test_async_saves_are_published_only_when_complete_and_resume_exactly(tmp_path):
    sync = spawn(save_every_step, 2, args=(str(tmp_path / "sync"), False))
    background = spawn(save_every_step, 2, args=(str(tmp_path / "async"), True))
    for seen, latest, resumed_step, same in sync:
        assert seen == [(1, True), (2, True), (3, True)]
        assert (latest, resumed_step, same) == (3, 3, True)
    for seen, latest, resumed_step, same in background:
        # Right after each save call its checkpoint is not there yet, and the tracker names the
        # previous one (published when the next save started).
        assert seen == [(None, False), (1, False), (2, False)]
        assert (latest, resumed_step, same) == (3, 3, True)
    assert not [n for n in os.listdir(tmp_path / "async") if n.endswith(".tmp")]


@pytest.mark.slow
def test_a_run_with_async_save_resumes_like_one_without(tiny_corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full, resumed = str(tmp_path / "full.jsonl"), str(tmp_path / "resumed.jsonl")
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=3, extra=[
        "--save", ckpt, "--save-interval", "1", "--async-save", "--keep-last-n-checkpoints", "2",
        "--metrics-file", full]),))  # fmt: skip
    assert checkpoint.latest_step(ckpt) == 3  # the run's end published its last save
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000003", checkpoint.TRACKER]
    with open(f"{ckpt}/{checkpoint.TRACKER}", "w") as fh:  # as if the run had died after step 2
        fh.write("2")
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=3, extra=[
        "--load", ckpt, "--metrics-file", resumed]),))  # fmt: skip
    a, b = _read(full)[2:], _read(resumed)
    assert [m["step"] for m in b] == [2]
    for x, y in zip(a, b, strict=True):
        for key in ("ntp_loss", "rl_loss", "grad_norm", "entropy_all", "reward"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


SLOW_WRITER = """
import time
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron_rmt import parallel
from megatron_rmt.async_save import AsyncSaves
parallel.init()
AsyncSaves().schedule(AsyncRequest(time.sleep, (300,), []), publish=lambda: None)
print("writing", flush=True)
time.sleep(300)
"""


def test_the_background_writer_dies_with_the_trainer():
    trainer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
    )
    try:
        assert trainer.stdout.readline().strip() == "writing"
        time.sleep(1)  # a writer that fails at its start is gone by now
        writers = psutil.Process(trainer.pid).children(recursive=True)
        assert writers and all(_alive(p) for p in writers)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    alive = _survivors(writers)
    assert not alive, [p.pid for p in alive]
