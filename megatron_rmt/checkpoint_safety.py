"""Reading a checkpoint must not run code from it: the checks made before anything is loaded.

torch.distributed.checkpoint, under megatron-core's `dist_checkpointing.load`, unpickles the
`.metadata` file with plain `pickle.load` and every non-tensor item ("bytes" items: the layers'
`_extra_state` and, from megatron-core 0.19, the checkpoint's common part) with
`torch.load(weights_only=False)`; megatron-core up to 0.18 keeps the common part in `common.pt`
instead and reads it with torch's default (weights-only, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
is set). Each of these could run code from a crafted file. So before the load:

- `.metadata` is unpickled with an allow-list: the dataclasses and enums of
  torch.distributed.checkpoint's metadata, planner and filesystem modules, torch.Size, torch
  dtypes and layouts. A pickle naming anything else is refused before any of it is called.
- every bytes item and `common.pt` must load with `weights_only=True`.
- the common part must be there, in the form the installed megatron-core reads: `common.pt`
  (every release reads it) or the `common_state` item (0.19 and later); a checkpoint of 0.19
  opened with an older release is refused saying so (docs/checkpoints.md, "Across versions").
- RNG files are read here, weights-only (`read_rng_file`).

Once these pass, the files hold only data, and the real load reads the same bytes. Refusals
name the file; docs/checkpoints.md says what this covers and what it does not.
"""

import dataclasses
import enum
import io
import os
import pickle
from importlib.metadata import version

import torch
from packaging.version import Version  # megatron-core depends on it (every release)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_rmt.config import UserError

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


COMMON_FILE = "common.pt"  # the common part as megatron-core <= 0.18 writes it
# ... and as 0.19 writes it: one ShardedObject inside the DCP files (its unique key).
COMMON_ITEM = "common_state/shard_0_1"


def mcore_version() -> Version:
    return Version(version("megatron-core"))


def reads_common_item() -> bool:
    """Whether the installed megatron-core finds a common part stored as `COMMON_ITEM`."""
    return mcore_version().release >= (0, 19)


class CheckpointError(UserError):
    """A checkpoint file this project refuses to read (its message names the file)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only what DCP metadata is made of; anything else stops the unpickling."""

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if _allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, not checkpoint metadata")
        return found


def _allowed(module: str, name: str) -> bool:
    if module in _DCP_MODULES:
        cls = getattr(__import__(module, fromlist=[name]), name, None)
        return isinstance(cls, type) and (
            dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)
        )
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }


def check_checkpoint_files(path: str) -> None:
    """Refuse the checkpoint directory `path` unless loading it can run no code."""
    metadata_file = os.path.join(path, ".metadata")
    try:
        with open(metadata_file, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{metadata_file}: missing; not a complete checkpoint") from None
    except Exception as e:  # a damaged or crafted pickle fails in many ways
        raise CheckpointError(f"{metadata_file}: refused: {e}") from None
    bytes_keys = {
        key
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, BytesStorageMetadata)
    }
    for index, info in metadata.storage_data.items():
        if index.fqn in bytes_keys:
            _check_bytes_item(path, index.fqn, info)
    _check_common_part(path, COMMON_ITEM in bytes_keys)


def _check_common_part(path: str, has_item: bool) -> None:
    """`common.pt` when there is one (megatron-core reads it first, whatever its release);
    else the `common_state` item (already checked as a bytes item), which only 0.19+ reads."""
    common_file = os.path.join(path, COMMON_FILE)
    if os.path.exists(common_file):
        _load_weights_only(common_file)
    elif not has_item:
        raise CheckpointError(
            f"{path}: no common part (neither {COMMON_FILE} nor a {COMMON_ITEM} item); "
            f"not a complete checkpoint"
        )
    elif not reads_common_item():
        raise CheckpointError(
            f"{path}: written by megatron-core >= 0.19 (no {COMMON_FILE}: its common part is "
            f"inside the DCP files), which megatron-core {mcore_version()} cannot read; load it "
            f"with megatron-core 0.19 (Python >= 3.12), or take its weights across through "
            f"tools/convert_megatron_to_hf.py there (docs/checkpoints.md)"
        )


def _check_bytes_item(path: str, key: str, info) -> None:
    name = info.relative_path
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise CheckpointError(f"{path}/.metadata: refused: item {key} points outside it ({name})")
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{path}/{name}: refused: item {key} is stored transformed")
    with open(os.path.join(path, name), "rb") as fh:
        fh.seek(info.offset)
        raw = fh.read(info.length)
    _load_weights_only(io.BytesIO(raw), f"{path}/{name} (item {key})")


def _load_weights_only(source, label: str | None = None):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [line.strip() for line in str(e).splitlines()]
        why = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{label or source}: refused: not tensors and plain values only, loading it could "
            f"run code ({why}); see docs/checkpoints.md"
        ) from None


def read_rng_file(path: str) -> dict | None:
    """An RNG file (None if there is none), read without running code: anything beyond tensors
    and plain containers is refused. Files of earlier releases (tuples and NumPy arrays) pass
    where torch's weights-only reader accepts NumPy arrays (it does in torch 2.13)."""
    if not os.path.exists(path):
        return None
    try:
        return _load_weights_only(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; if you trust its source, delete the checkpoint's rng_rank*.pt files to "
            f"resume without them"
        ) from None
