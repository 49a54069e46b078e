"""What differs between the Megatron-Core lines this project supports (0.16 on Python 3.11, 0.19
on Python 3.12; `make test` runs this file on both): where a checkpoint keeps its common part
(`common.pt` up to 0.18, a `common_state` item inside the DCP files from 0.19), that the safety
checks read it in both forms and refuse a crafted one in the form the installed release writes,
and that a checkpoint without one, or of a newer form than the release reads, is refused in one
line saying what to do (docs/checkpoints.md, "Across versions")."""

import os
import pickle

import pytest
import torch
from conftest import missing
from distributed import spawn

from megatron_rmt import checkpoint, checkpoint_safety
from megatron_rmt.checkpoint_safety import COMMON_FILE, COMMON_ITEM, CheckpointError

pytestmark = pytest.mark.mcore


def save_then_load(root):
    """The tiny model of test_parallel_step after one training step, saved as step 3 and loaded
    into a fresh one: (step, consumed samples, the scheduler's steps, same Adam moments)."""
    from test_parallel_step import VOCAB, _cfg, _train_step

    from megatron_rmt.build import build_trainable

    trainable = build_trainable(_cfg(), VOCAB)
    _train_step(trainable)
    progress = checkpoint.Progress(step=3, consumed_samples=6, totals={"x": 1})
    checkpoint.save(root, trainable, progress, _cfg())
    fresh = build_trainable(_cfg(), VOCAB)
    loaded = checkpoint.load(root, fresh)
    moments = [_moments(t.optimizer) for t in (trainable, fresh)]
    same = len(moments[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*moments, strict=True))
    return loaded.step, loaded.consumed_samples, fresh.scheduler.num_steps, same


def _moments(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)
    return [
        state[key].clone()
        for group in inner.param_groups
        for p in group["params"]
        for state in [inner.state[p]]
        for key in ("exp_avg", "exp_avg_sq")
        if key in state
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    assert spawn(save_then_load, 1, args=(root,))[0] == (3, 6, 1, True)
    return checkpoint.iteration_dir(root, 3)


def _metadata(path):
    with open(os.path.join(path, ".metadata"), "rb") as fh:
        return pickle.load(fh)  # this test's own checkpoint: trusted


def _copy(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
            b.write(a.read())
    return dst


class Payload:
    """Unpickling this calls _touch: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def _touch(path):
    open(path, "w").close()


def test_the_common_part_is_where_this_release_reads_it(saved):
    has_file = os.path.exists(os.path.join(saved, COMMON_FILE))
    items = {i.fqn for i in _metadata(saved).storage_data}
    if checkpoint_safety.reads_common_item():  # 0.19: inside the DCP files, no common.pt
        assert not has_file and COMMON_ITEM in items
    else:  # 0.16: common.pt beside them
        assert has_file and COMMON_ITEM not in items
    checkpoint_safety.check_checkpoint_files(saved)


def test_a_crafted_common_part_is_refused_and_nothing_runs(saved, tmp_path):
    path, marker = _copy(saved, str(tmp_path / "crafted")), str(tmp_path / "ran")
    if checkpoint_safety.reads_common_item():
        metadata = _metadata(path)
        index = next(i for i in metadata.storage_data if i.fqn == COMMON_ITEM)
        evil = pickle.dumps(Payload(marker))
        with open(os.path.join(path, "evil.distcp"), "wb") as fh:
            fh.write(evil)
        metadata.storage_data[index] = type(metadata.storage_data[index])(
            "evil.distcp", 0, len(evil)
        )
        with open(os.path.join(path, ".metadata"), "wb") as fh:
            pickle.dump(metadata, fh)
        named = "evil.distcp"
    else:
        torch.save({"progress": Payload(marker)}, os.path.join(path, COMMON_FILE))
        named = COMMON_FILE
    with pytest.raises(CheckpointError, match="refused") as refused:
        checkpoint_safety.check_checkpoint_files(path)
    assert named in str(refused.value)
    assert not os.path.exists(marker)


def test_a_checkpoint_without_a_common_part_is_refused(saved, tmp_path):
    path = _copy(saved, str(tmp_path / "incomplete"))
    if os.path.exists(os.path.join(path, COMMON_FILE)):
        os.remove(os.path.join(path, COMMON_FILE))
    metadata = _metadata(path)
    metadata.state_dict_metadata.pop(COMMON_ITEM, None)
    for index in [i for i in metadata.storage_data if i.fqn == COMMON_ITEM]:
        del metadata.storage_data[index]
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        pickle.dump(metadata, fh)
    with pytest.raises(CheckpointError, match="no common part.*not a complete checkpoint"):
        checkpoint_safety.check_checkpoint_files(path)


def test_a_newer_form_on_an_older_release_says_which_release_reads_it(saved, monkeypatch):
    if not checkpoint_safety.reads_common_item():
        missing("a checkpoint in megatron-core 0.19's form", "runs on the 0.19 line (make test-mc019)",
                ci_has_it=False)  # fmt: skip
    monkeypatch.setattr(checkpoint_safety, "reads_common_item", lambda: False)
    monkeypatch.setattr(checkpoint_safety, "mcore_version", lambda: "0.16.1")
    with pytest.raises(CheckpointError) as refused:
        checkpoint_safety.check_checkpoint_files(saved)
    message = str(refused.value)
    assert (
        "written by megatron-core >= 0.19" in message
        and "megatron-core 0.16.1 cannot read;" in message
    )
    assert "convert_megatron_to_hf.py" in message and "\n" not in message


def test_async_saves_use_megatron_cores_own_queue():
    """0.19 defaults a background save to NVIDIA Resiliency Extension's queue, which this
    project does not install; async_save.py drives megatron-core's own."""
    import inspect

    from megatron.core import dist_checkpointing

    args = checkpoint._async_save_args()
    assert args["async_sharded_save"] is True
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        assert args["async_strategy"] == "mcore"
    else:
        assert set(args) == {"async_sharded_save"}
