"""The `.metadata` allow-list (checkpoint_safety.py) is narrow: a real DCP checkpoint's metadata
passes, and a pickle naming any torch function beyond torch.Size and the dtypes is refused before
it is called, whatever torch module it names (`torch.save` writes a file of the pickle's choosing:
an allow-list widened to `torch.*` would let it run)."""

import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_rmt import checkpoint_safety
from megatron_rmt.checkpoint_safety import CheckpointError, check_checkpoint_files


def _call_pickle(module: str, name: str, *args: str) -> bytes:
    """Protocol 0 by hand: look up `module.name` (GLOBAL) and call it with string `args`."""
    strings = b"".join(b"V" + a.encode() + b"\n" for a in args)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + strings + b"tR."


def _checkpoint(path, metadata: bytes | None = None) -> str:
    """A DCP checkpoint as megatron-core writes one (a tensor, a bytes item like a layer's
    `_extra_state`, `common.pt`), its `.metadata` replaced by `metadata` if given."""
    os.makedirs(path, exist_ok=True)
    state = {"weight": torch.arange(6.0).view(2, 3), "extra": io.BytesIO(b"\x00\x01")}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    # megatron-core's writer leaves `storage_meta` unset; torch's own records the checkpoint's
    # pathlib path there, which the allow-list refuses (not checkpoint metadata).
    with open(os.path.join(path, ".metadata"), "rb") as fh:
        written = pickle.load(fh)  # this test's own file: trusted
    written.storage_meta = None
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        pickle.dump(written, fh)
    torch.save({"iteration": 3}, os.path.join(path, "common.pt"))
    if metadata is not None:
        with open(os.path.join(path, ".metadata"), "wb") as fh:
            fh.write(metadata)
    return str(path)


def test_a_real_checkpoint_passes(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    check_checkpoint_files(path)  # no refusal
    with open(os.path.join(path, ".metadata"), "rb") as fh:
        metadata = checkpoint_safety._MetadataUnpickler(fh).load()
    weight = metadata.state_dict_metadata["weight"]
    assert weight.size == torch.Size([2, 3]) and weight.properties.dtype == torch.float32


@pytest.mark.parametrize(
    "module,name",
    [
        ("torch.serialization", "save"),  # how pickle names torch.save
        ("torch", "save"),  # the same function through the top-level module
        ("torch.hub", "load"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemWriter"),  # a class, not metadata
    ],
)
def test_a_pickle_naming_a_torch_function_is_refused_before_it_runs(tmp_path, module, name):
    marker = str(tmp_path / "written_by_the_pickle")
    crafted = _call_pickle(module, name, "code from a checkpoint ran", marker)
    path = _checkpoint(tmp_path / "ckpt", crafted)
    try:
        check_checkpoint_files(path)
        error = None
    except Exception as e:  # the refusal, or whatever the called function left behind
        error = e
    assert not os.path.exists(marker), f"unpickling .metadata ran {module}.{name}: {marker}"
    assert isinstance(error, CheckpointError), f"{module}.{name} was not refused: {error!r}"
    assert f"it names {module}.{name}, not checkpoint metadata" in str(error)
    assert ".metadata: refused" in str(error)


def test_the_crafted_pickle_would_run(tmp_path):
    """The payload above does what it claims when nothing guards it (so the refusal matters)."""
    marker = str(tmp_path / "written_by_the_pickle")
    pickle.loads(_call_pickle("torch.serialization", "save", "ran", marker))
    assert torch.load(marker) == "ran"
