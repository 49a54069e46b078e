"""Issue 15, state and data side: checkpoints never run code, one writer per --save, bad data
stops at set-up by name, metrics after a resume, user errors as one line, and megatron-core's
checkpoint helper process dies with the trainer.

Entry points run as subprocesses with warnings off (megatron-core warns on import when Apex is
missing): what is left on stderr is exactly what the run itself printed.
"""

import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from conftest import GPT2, ROOT
from distributed import spawn
from test_train import ScriptedEngine, _flags, _read

from megatron_rmt import checkpoint, coldstart, config, launch, posttrain, train
from megatron_rmt.save_lock import LOCK_NAME, SaveDirLocked, acquire, release, save_lock
from megatron_rmt.tokenizer import tokenizer_of


def run_entry(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit status 2 and a single `error: ...` line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# -- 4. checkpoints never run code ----------------------------------------------------------


def _touch(path):
    with open(path, "w") as fh:
        fh.write("code from a checkpoint ran")


class Payload:
    """Unpickling this calls _touch: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def _draws() -> list[float]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = float(torch.rand(1))
    return [random.random(), float(np.random.rand()), float(torch.rand(1)), tracked]


def _refusal(root, trainable) -> tuple[str, bool] | None:
    try:
        checkpoint.load(root, trainable)
    except Exception as e:
        return str(e), isinstance(e, config.UserError)
    return None


def rng_files_hold_tensors_only(argv, root, marker):
    run = launch.setup(config.parse(argv))
    run.engine = ScriptedEngine(run.tokenizer)
    train.train_step(run, 0)
    checkpoint.save(root, run.trainable, checkpoint.Progress(step=1), run.cfg)
    after_save = _draws()
    rng_file = os.path.join(checkpoint.iteration_dir(root, 1), "rng_rank00000.pt")
    torch.load(rng_file, weights_only=True)  # loads without any allow-listing
    _draws()
    checkpoint.load(root, run.trainable)
    restored = _draws() == after_save

    torch.save({"layout": [1, 1, 1], "python": Payload(marker)}, rng_file)
    crafted = _refusal(root, run.trainable)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    legacy = {  # what earlier releases wrote: tuples and NumPy arrays
        "layout": (1, 1, 1),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    torch.save(legacy, rng_file)
    before_legacy = _draws()
    checkpoint.load(root, run.trainable)  # torch 2.13 reads these weights-only: still restored
    legacy_restored = _draws() == before_legacy
    os.remove(rng_file)  # without RNG files a checkpoint loads too (the way on, if refused)
    step = checkpoint.load(root, run.trainable).step
    return restored, crafted, legacy_restored, step, crafted_dcp_files(root, run, marker)


def _craft_metadata(path, marker):
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        pickle.dump(Payload(marker), fh)
    return ".metadata"


def _craft_bytes_item(path, marker):
    """Well-formed metadata whose first bytes item (an _extra_state) points at a pickle."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(os.path.join(path, ".metadata"), "rb") as fh:
        metadata = pickle.load(fh)  # this test's own checkpoint: trusted
    key = next(
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
    )
    index = next(i for i in metadata.storage_data if i.fqn == key)
    evil = pickle.dumps(Payload(marker))
    with open(os.path.join(path, "evil.distcp"), "wb") as fh:
        fh.write(evil)
    metadata.storage_data[index] = _StorageInfo("evil.distcp", 0, len(evil))
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        pickle.dump(metadata, fh)
    return "evil.distcp"


def _craft_common(path, marker):
    torch.save({"progress": Payload(marker)}, os.path.join(path, "common.pt"))
    return "common.pt"


def crafted_dcp_files(root, run, marker) -> dict:
    """Each file megatron-core would unpickle, crafted in turn: (the file, the refusal)."""
    path = checkpoint.iteration_dir(root, 1)
    originals = {}
    for name in (".metadata", "common.pt"):
        with open(os.path.join(path, name), "rb") as fh:
            originals[name] = fh.read()
    out = {}
    for craft in (_craft_metadata, _craft_bytes_item, _craft_common):
        named = craft(path, marker)
        out[craft.__name__] = named, _refusal(root, run.trainable)
        for name, content in originals.items():
            with open(os.path.join(path, name), "wb") as fh:
                fh.write(content)
    return out


def test_rng_state_round_trips_and_crafted_pickles_are_refused(tiny_corpus, tmp_path):
    root, marker = str(tmp_path / "ckpt"), str(tmp_path / "ran")
    restored, crafted, legacy_restored, step, dcp = spawn(
        rng_files_hold_tensors_only, 1, args=(_flags(tiny_corpus), root, marker)
    )[0]
    assert restored  # python, numpy, torch and the TP tracker streams continue as saved
    assert not os.path.exists(marker)  # nothing in the crafted file ran
    assert crafted is not None and crafted[1], crafted
    assert "rng_rank00000.pt" in crafted[0] and "refused" in crafted[0]
    assert "delete the checkpoint's rng_rank*.pt" in crafted[0]
    assert legacy_restored
    assert step == 1
    for craft, (named, refusal) in dcp.items():  # what torch's DCP reader would unpickle
        assert refusal is not None and refusal[1], (craft, refusal)
        assert named in refusal[0] and "refused" in refusal[0], (craft, refusal)
    assert not os.path.exists(marker)


# -- 5. one writer per --save ---------------------------------------------------------------

HOLDER = "import sys, time; from megatron_rmt.save_lock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)"  # noqa: E501


def hold_lock(root) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_on_a_save_dir_is_refused_with_host_and_pid(tiny_corpus, tmp_path):
    root = str(tmp_path / "ckpt")
    holder = hold_lock(root)
    try:
        result = run_entry(
            "megatron_rmt.train", *_flags(tiny_corpus), "--save", root, "--train-iters", "1"
        )
    finally:
        holder.kill()
        holder.wait()
    line = one_error_line(result)
    assert f"host {socket.gethostname()}" in line and f"pid {holder.pid}" in line, line
    assert not os.path.exists(checkpoint.iteration_dir(root, 1))


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    root = str(tmp_path / "ckpt")
    holder = hold_lock(root)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = acquire(root)  # the killed holder's flock went with it
    with open(os.path.join(root, LOCK_NAME)) as fh:
        assert json.load(fh)["pid"] == os.getpid()
    release(lock)
    assert not os.path.exists(os.path.join(root, LOCK_NAME))


def test_lock_naming_another_host_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 4242}))
    with pytest.raises(
        SaveDirLocked, match=f"node-elsewhere, pid 4242.*remove {re.escape(str(root))}"
    ):
        acquire(str(root))


def ranks_take_the_lock(root):
    """First against a lock naming another host (refused), then against none (taken)."""
    lock_file = os.path.join(root, LOCK_NAME)
    try:
        with save_lock(root):
            refused = None
    except SaveDirLocked as e:
        refused = str(e)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        os.remove(lock_file)  # as the message says to, once that run has ended
    torch.distributed.barrier()
    with save_lock(root):
        held = os.path.exists(lock_file)
        torch.distributed.barrier()  # rank 0 releases it on leaving
    return refused, held


def test_every_rank_learns_the_outcome(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 4242}))
    (refused0, held0), (refused1, held1) = spawn(ranks_take_the_lock, 2, args=(str(root),))
    assert refused0 == refused1 and "node-elsewhere, pid 4242" in refused0
    assert held0 and held1
    assert not (root / LOCK_NAME).exists()  # released at the end


# -- 6 and 9. bad data and other user errors: one line, before the model ------------------


def test_truncated_bin_stops_at_set_up_before_the_model(tiny_corpus, tmp_path, monkeypatch):
    prefix = str(tmp_path / "cut")
    with open(tiny_corpus + ".bin", "rb") as src, open(prefix + ".bin", "wb") as dst:
        dst.write(src.read()[:1000])
    with open(tiny_corpus + ".idx", "rb") as src, open(prefix + ".idx", "wb") as dst:
        dst.write(src.read())

    def no_model(*args):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(launch, "build_trainable", no_model)
    with pytest.raises(config.UserError, match=f"{prefix}.bin: truncated"):
        launch.setup(config.parse(_flags(prefix)))


def _args(args, tiny_corpus, tmp_path):
    swap = {"PREFIX_NOWHERE": str(tmp_path / "nothing"), "CORPUS": tiny_corpus}
    return [swap.get(a, a) for a in args] + ["--config", "configs/tiny_cpu.yaml", *GPT2]


@pytest.mark.parametrize(
    "module,args,expected",
    [
        ("megatron_rmt.train", [], "--data-path is required"),
        ("megatron_rmt.train", ["--data-path", "PREFIX_NOWHERE"], "no indexed dataset there"),
        (
            "megatron_rmt.evaluate",
            ["build-set", "--eval-data", "PREFIX_NOWHERE", "--output", "set.jsonl"],
            "no indexed dataset there",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tiny_corpus, tmp_path, module, args, expected):
    result = run_entry(module, *_args(args, tiny_corpus, tmp_path))
    assert expected in one_error_line(result)


GREEDY = "--rollout-temperature 0 --rollout-url http://x:1 --weight-transfer gloo".split()


@pytest.mark.parametrize(
    "main,args,expected",
    [
        (train.main, ["--data-path", "CORPUS", "--group-size", "1"], "group_size"),
        (train.main, ["--data-path", "CORPUS", *GREEDY], "--rollout-temperature 0 (greedy)"),
        (posttrain.main, ["--prompt-data", "PREFIX_NOWHERE", *GREEDY], "is for evaluation"),
        (posttrain.main, [], "--prompt-data is required"),
        (coldstart.main, [], "coldstart needs --data-path"),
    ],
)
def test_every_entry_point_reports_user_errors_the_same_way(
    tiny_corpus, tmp_path, capsys, monkeypatch, main, args, expected
):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        config.run_cli(main, _args(args, tiny_corpus, tmp_path))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


# -- 8. metrics after a resume --------------------------------------------------------------


class FlakyEngine(ScriptedEngine):
    """The rollout service fails at steps 0 and 2: rollout_failures is 1, 1, 2, 2."""

    def generate(self, requests):
        if self.version in (0, 2):
            raise ConnectionError("service down")
        return super().generate(requests)


def _train_flaky(argv):
    train.main(argv, engine=FlakyEngine(tokenizer_of(config.parse(argv).data)))


def test_resume_keeps_one_metrics_row_per_step_and_continues_totals(tiny_corpus, tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    extra = ["--save", ckpt, "--save-interval", "2", "--metrics-file", metrics]
    spawn(_train_flaky, 1, args=(_flags(tiny_corpus, iters=3, extra=extra),))
    # The run died after step 2's row was written but before its checkpoint: resume from 2.
    with open(f"{ckpt}/{checkpoint.TRACKER}", "w") as fh:
        fh.write("2")
    spawn(_train_flaky, 1, args=(_flags(tiny_corpus, iters=4, extra=[*extra, "--load", ckpt]),))
    rows = _read(metrics)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["rollout_failures"] for r in rows] == [1, 1, 2, 2]
    assert not os.path.exists(os.path.join(ckpt, LOCK_NAME))  # released at the end of each run


# -- 7. megatron-core's checkpoint helper process ------------------------------------------

SAVER = """
import os, sys, time
import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_rmt import checkpoint, config, parallel
parallel.init()
state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}
checkpoint._write(sys.argv[1], 0, state, config.Config(), with_rng=False)
print("saved", flush=True)
time.sleep(300)
"""


def test_checkpoint_helper_processes_die_with_the_trainer(tmp_path):
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
    )
    try:
        assert saver.stdout.readline().strip() == "saved"
        helpers = psutil.Process(saver.pid).children(recursive=True)
        assert helpers  # megatron-core's results-queue manager, at least
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    alive = _survivors(helpers)
    assert not alive, [p.pid for p in alive]


def _survivors(procs: list, within_s: float = 30.0) -> list:
    """Those of `procs` still alive after `within_s` seconds; killed, so that none is ever left
    behind, even when the test fails."""
    deadline = time.monotonic() + within_s
    while (alive := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in alive:
        p.kill()
    return alive


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
