"""Streaming pretraining windows from indexed shards (.bin/.idx), with a resumable position.

`build_train_dataset` turns Megatron-LM style `--data-path` (prefixes, optionally weighted:
`0.7 pathA 0.3 pathB`) and `--split` into megatron.core's GPTDataset / BlendedDataset through
BlendedMegatronDatasetBuilder, so shuffling, epochs, splits and blending are exactly Megatron's.
`MicrobatchIterator` walks that dataset in order from a global `consumed_samples` position.

Deliberate choices:
- Sample layout is Megatron's pretraining sampler: microbatch k of a step covers the global
  samples [c, c + mbs * dp) with c = consumed_samples, and DP rank r takes the r-th run of `mbs`
  of them. DP ranks are disjoint; TP/PP ranks of one replica share a dp_rank and so get the same
  samples. Resuming is just constructing the iterator with the saved `consumed_samples`.
- Document boundaries come from EOD tokens (shards are built with `--append-eod`), the same
  signal Megatron's reset_position_ids uses: `context_len[j]` counts same-document tokens up to
  and including position j, restarting at 1 after an EOD and at the window start.
- The shards' EOD must be the tokenizer's (`--eod-token`, see tokenizer.py): a shard whose first
  document ends with the id of the other choice (e.g. Megatron-LM's `<|im_end|>` for Qwen3) is
  refused with the flag to set, since one run has one EOD id (its boundaries, candidate masks,
  loss mask). Shards built with different EODs cannot be blended: rebuild one.
- Every shard is checked when `--data-path` is parsed, from its header and file sizes alone
  (`check_shard`): a missing file, an empty, truncated or foreign `.idx`, and a `.bin` shorter
  than its index says stop the run at set-up with the file's name (DataError, a UserError). The
  entry points check on every rank and agree (`parallel.agree`): a file missing on one node
  stops all ranks at once with that node's name.
- `loss_mask` is GPTDataset's with `eod_mask_loss`: 0 where the input token is EOD (its label is
  the next document's first token, which no context predicts) and where the label is padding.
- Every rank builds the dataset (each replica rank reads its own windows); the builder lets
  global rank 0 write the index cache first, so build_train_dataset is collective when
  torch.distributed is initialised. The cache goes next to the data (`<dir>/cache`), or to
  `$XDG_CACHE_HOME/megatron_rmt/datasets` when that directory is not writable. A node that
  cannot see rank 0's cache directory (no shared filesystem) builds its own copy first
  (`node_cache.py`).
- megatron-core 0.16's BlendedDataset asks torch.distributed for the rank unguarded, so outside
  a distributed run (tests, tools) a private world-of-one gloo group on an in-memory store
  stands in while the datasets are built, and is torn down right after.
"""

import contextlib
import os
import pickle
import struct
import sys

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_rmt import node_cache
from megatron_rmt.config import UserError


class DataError(UserError, ValueError):
    """A `--data-path` that names no usable shard; the message names the file."""


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """`["pathA", "pathB"]` or `["0.7", "pathA", "0.3", "pathB"]` -> (prefixes, weights), every
    shard checked by `check_shard` (cheap: headers and sizes), so that a bad file stops the run
    at set-up, by name, instead of inside a step."""
    if not data_path:
        raise DataError("data_path is empty: give at least one .bin/.idx prefix")
    try:
        prefixes, weights = get_blend_from_list(list(data_path))
    except (AssertionError, ValueError):
        raise DataError(
            f"data_path {' '.join(data_path)}: expected prefixes, or weight-prefix pairs "
            f"(W1 P1 W2 P2 ...)"
        ) from None
    for prefix in prefixes:
        check_shard(prefix)
    return prefixes, weights


_MAGIC = b"MMIDIDX\x00\x00"  # an index's first bytes (megatron.core.datasets.indexed_dataset)
_HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count


def check_shard(prefix: str) -> None:
    """Refuse, naming the file, a prefix without both files, an `.idx` that is empty, truncated
    or not an index, and a `.bin` shorter than its index says: what megatron-core would
    otherwise report without the file's name (`cannot mmap an empty file`) or only inside a step
    when it reads past the end."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    have = [os.path.isfile(p) for p in (idx, bin_)]
    if not any(have):
        hint = " (give the prefix, without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DataError(
            f"{prefix}: no indexed dataset there (no {prefix}.bin/.idx){hint}; build one "
            f"with tools/preprocess_data.py"
        )
    if not all(have):
        raise DataError(
            f"{idx if not have[0] else bin_}: missing (the other file of the pair exists)"
        )
    size = os.path.getsize(idx)
    with open(idx, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES:
            raise DataError(f"{idx}: empty or truncated ({size} bytes, the header alone is 34)")
        magic, version, code, sequences, documents = struct.unpack("<9sQBQQ", head)
        if magic != _MAGIC or version != 1 or code not in {d.value for d in DType}:
            raise DataError(f"{idx}: not a Megatron indexed-dataset index (bad header)")
        needed = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
        if size < needed:
            raise DataError(
                f"{idx}: truncated: {size} bytes, its header promises {needed} "
                f"({sequences} sequences, {documents - 1} documents)"
            )
        if sequences == 0:
            raise DataError(f"{idx}: holds no documents")
        fh.seek(_HEADER_BYTES + (sequences - 1) * 4)
        (last_length,) = struct.unpack("<i", fh.read(4))
        fh.seek(_HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", fh.read(8))
    data_bytes = last_pointer + last_length * DType.size(code)
    if os.path.getsize(bin_) < data_bytes:
        raise DataError(
            f"{bin_}: truncated: {os.path.getsize(bin_)} bytes, its index {idx} refers to "
            f"{data_bytes}; rebuild the pair with tools/preprocess_data.py"
        )


def default_cache_dir(prefixes: list[str]) -> str:
    """`<dir of the first prefix>/cache`, or the user cache dir when the data is read-only."""
    data_dir = os.path.dirname(os.path.abspath(prefixes[0]))
    cache = os.path.join(data_dir, "cache")
    if os.access(cache if os.path.isdir(cache) else data_dir, os.W_OK):
        return cache
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(user_cache, "megatron_rmt", "datasets")


def build_train_dataset(
    data_path: list[str],
    split: str,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer,
    cache_dir: str | None = None,
):
    """The training split of the (blended) corpus: at least `num_samples` windows of
    `seq_length` tokens (+1 for the shifted labels). `tokenizer` needs `eod` and `vocab_size`."""
    prefixes, weights = parse_data_path(data_path)
    check_eod(prefixes, tokenizer, checked=True)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir(prefixes))
    if dist.is_initialized() and dist.get_world_size() > 1:
        kwargs = dict(data_path=data_path, split=split, seq_length=seq_length,
                      num_samples=num_samples, seed=seed, tokenizer=tokenizer, cache_dir=cache_dir)  # fmt: skip
        node_cache.ensure_on_every_node(kwargs)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
        create_attention_mask=False,  # the model applies its own causal mask
    )
    # Only the train split is drawn from: keep its document range from `split`, build no others
    # (a valid/test share with no documents would make Megatron's epoch count loop forever).
    config.split_matrix = [config.split_matrix[0], None, None]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
    with _world_of_one_if_needed():
        train = builder.build()[0]
    if train is None or len(train) < num_samples:
        raise ValueError(
            f"the train split has {0 if train is None else len(train)} samples, "
            f"{num_samples} requested (split={split!r})"
        )
    return train


def check_eod(prefixes: list[str], tokenizer, checked: bool = False) -> None:
    """Refuse shards whose first document ends with another `eod_token` choice's id than the
    tokenizer's EOD (`tokenizer.eod_choices`); shards without EODs are not checked here.
    Each shard is first checked with `check_shard` unless the caller did (`checked`)."""
    others = {i: name for name, i in getattr(tokenizer, "eod_choices", {}).items()}
    others.pop(tokenizer.eod, None)
    for prefix in prefixes:
        if not checked:
            check_shard(prefix)
        shard = IndexedDataset(prefix)
        if len(shard.document_indices) < 2 or len(shard) == 0:
            continue
        tail = shard[int(shard.document_indices[1]) - 1]  # document 0's last sequence
        last = int(tail[-1]) if len(tail) else None
        if last in others:
            raise DataError(
                f"{prefix}: documents end with id {last}, the EOD of --eod-token "
                f"{others[last]}, but this run's EOD is {tokenizer.eod}: train with "
                f"--eod-token {others[last]} or rebuild the shard (docs/data.md)"
            )


@contextlib.contextmanager
def _world_of_one_if_needed():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def context_lengths(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Same-document tokens up to and including each position, counted from the window start.

    tokens: [b, s] int64 -> [b, s] int64; 1 at position 0 and right after every EOD."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).expand(b, s)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - last_start + 1


class MicrobatchIterator:
    """Yields this DP rank's microbatches, in order, from global position `consumed_samples`.

    Each item is a dict of CPU tensors: tokens, labels, position_ids, context_len [b, s] int64,
    loss_mask [b, s] float32, sample_ids [b] int64 (global sample index)."""

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        per_microbatch = micro_batch_size * dp_size
        if global_batch_size % per_microbatch:
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        if consumed_samples % per_microbatch:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not a multiple of {per_microbatch}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_microbatches = global_batch_size // per_microbatch
        self._consumed = consumed_samples
        self._eod = dataset.config.tokenizer.eod

    @property
    def consumed_samples(self) -> int:
        """Global samples handed out so far, over all DP ranks: the state to checkpoint."""
        return self._consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        per_microbatch = self.micro_batch_size * self.dp_size
        if self._consumed + per_microbatch > len(self.dataset):
            raise StopIteration
        first = self._consumed + self.dp_rank * self.micro_batch_size
        sample_ids = torch.arange(first, first + self.micro_batch_size)  # [b]
        samples = [self.dataset[int(i)] for i in sample_ids]
        tokens = torch.stack([x["tokens"] for x in samples])  # [b, s]
        self._consumed += per_microbatch
        return {
            "tokens": tokens,
            "labels": torch.stack([x["labels"] for x in samples]),  # [b, s]
            "loss_mask": torch.stack([x["loss_mask"] for x in samples]).float(),  # [b, s]
            "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).clone(),  # [b, s]
            "context_len": context_lengths(tokens, self._eod),  # [b, s]
            "sample_ids": sample_ids,
        }


if __name__ == "__main__":  # node_cache.py: a node's own index cache, built as a world of one
    build_train_dataset(**pickle.load(sys.stdin.buffer))
