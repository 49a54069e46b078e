"""megatron_rmt.data: windows, document context, DP layout, resume, blending, cache placement.

Synthetic shards are written with megatron.core's IndexedDatasetBuilder: documents of random
length whose last token is EOD, so every expected value can be recomputed by a plain loop.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from distributed import spawn
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_rmt import data, parallel

EOD = 0
SEQ = 32


class StubTokenizer:
    """What GPTDataset asks of a tokenizer: eod, vocab_size and a cache identity."""

    eod = EOD
    vocab_size = 1000
    unique_identifiers = {"class": "StubTokenizer"}


def write_shard(prefix: str, low: int, high: int, num_docs: int, seed: int) -> list[np.ndarray]:
    """Documents with tokens in [low, high) and a final EOD; returns them."""
    rng = np.random.default_rng(seed)
    docs = []
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        doc = np.append(rng.integers(low, high, size=rng.integers(3, 60)), EOD)
        builder.add_document(doc, [len(doc)])
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    a, b = str(root / "a_text_document"), str(root / "b_text_document")
    write_shard(a, 1, 500, 300, seed=1)
    write_shard(b, 500, 1000, 300, seed=2)
    return a, b


def build(data_path, num_samples=200, cache_dir=None):
    return data.build_train_dataset(
        data_path, "969,30,1", SEQ, num_samples, 1234, StubTokenizer(), cache_dir
    )


def naive_context_len(row: list[int]) -> list[int]:
    out, run = [], 0
    for j in range(len(row)):
        run = 1 if j == 0 or row[j - 1] == EOD else run + 1
        out.append(run)
    return out


def test_context_lengths_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (5, 50), generator=gen)  # EOD (0) about every 4th token
    tokens[0] = 7  # one row without any EOD: counts from the window start
    got = data.context_lengths(tokens, EOD)
    want = torch.tensor([naive_context_len(r) for r in tokens.tolist()])
    assert torch.equal(got, want)


def test_microbatch_fields(shards):
    dataset = build([shards[0]])
    batch = next(data.MicrobatchIterator(dataset, 3, 6, 0, 1))
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == (3, SEQ) and tokens.dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["sample_ids"].tolist() == [0, 1, 2]
    for row, i in enumerate(batch["sample_ids"].tolist()):
        window = dataset[i]
        assert torch.equal(tokens[row], window["tokens"])
        assert torch.equal(labels[row], window["labels"])
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    assert torch.equal(batch["loss_mask"], (tokens != EOD).float())
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(3, SEQ))
    want = torch.tensor([naive_context_len(r) for r in tokens.tolist()])
    assert torch.equal(batch["context_len"], want)


def test_dp_ranks_get_disjoint_samples_covering_each_batch(shards):
    dataset = build([shards[0]])
    mbs, dp, gbs = 2, 3, 12
    per_rank = [
        [next(it)["sample_ids"].tolist() for _ in range(gbs // (mbs * dp))]
        for it in (data.MicrobatchIterator(dataset, mbs, gbs, r, dp) for r in range(dp))
    ]
    seen = [i for rank in per_rank for micro in rank for i in micro]
    assert sorted(seen) == list(range(gbs))  # disjoint, and the global batch is covered


def test_resume_continues_with_next_unseen_sample(shards):
    dataset = build(list(shards))  # a blend, the harder case
    mbs, dp, gbs = 2, 2, 8
    uninterrupted = data.MicrobatchIterator(dataset, mbs, gbs, 1, dp)
    reference = [next(uninterrupted) for _ in range(6)]

    first_run = data.MicrobatchIterator(dataset, mbs, gbs, 1, dp)
    for _ in range(4):  # one global batch = 2 microbatches: stop after two steps
        next(first_run)
    state = first_run.consumed_samples
    assert state == 2 * gbs
    resumed = data.MicrobatchIterator(dataset, mbs, gbs, 1, dp, consumed_samples=state)
    for want in reference[4:]:
        got = next(resumed)
        assert torch.equal(got["sample_ids"], want["sample_ids"])
        assert torch.equal(got["tokens"], want["tokens"])


def test_iterator_rejects_misaligned_layout(shards):
    dataset = build([shards[0]])
    with pytest.raises(ValueError, match="multiple"):
        data.MicrobatchIterator(dataset, 2, 6, 0, 2)
    with pytest.raises(ValueError, match="consumed_samples"):
        data.MicrobatchIterator(dataset, 2, 8, 0, 2, consumed_samples=3)


def test_blend_follows_weights(shards):
    a, b = shards
    n = 400
    dataset = build(["0.7", a, "0.3", b], num_samples=n)
    from_a = sum(int(dataset[i]["tokens"].max() < 500) for i in range(n))
    assert abs(from_a / n - 0.7) < 0.02


def test_parse_data_path_reports_missing_prefix(tmp_path):
    with pytest.raises(data.DataError, match="preprocess_data"):
        data.parse_data_path([str(tmp_path / "nothing")])


def _damaged(shards, tmp_path, case: str) -> tuple[str, str]:
    """A copy of shard `a` damaged as `case` says; returns (its prefix, the file to be named)."""
    prefix = str(tmp_path / "d_text_document")
    with open(shards[0] + ".bin", "rb") as fh:
        bin_bytes = fh.read()
    with open(shards[0] + ".idx", "rb") as fh:
        idx_bytes = fh.read()
    files = {
        "empty idx": (bin_bytes, b""),
        "idx cut in its header": (bin_bytes, idx_bytes[:20]),
        "idx cut in its arrays": (bin_bytes, idx_bytes[:-16]),
        "not an idx": (bin_bytes, b"x" * len(idx_bytes)),
        "truncated bin": (bin_bytes[:-2], idx_bytes),
        "missing bin": (None, idx_bytes),
    }[case]
    for suffix, content in zip((".bin", ".idx"), files, strict=True):
        if content is not None:
            with open(prefix + suffix, "wb") as fh:
                fh.write(content)
    named = prefix + (".bin" if case in ("truncated bin", "missing bin") else ".idx")
    return prefix, named


@pytest.mark.parametrize(
    "case",
    [
        "empty idx",
        "idx cut in its header",
        "idx cut in its arrays",
        "not an idx",
        "truncated bin",
        "missing bin",
    ],
)
def test_damaged_shard_is_named_at_parse_time(shards, tmp_path, case):
    prefix, named = _damaged(shards, tmp_path, case)
    with pytest.raises(data.DataError, match=f"^{named}: "):
        data.parse_data_path(["0.5", shards[1], "0.5", prefix])


def test_prefix_given_with_its_suffix_says_so(shards):
    with pytest.raises(data.DataError, match="without .bin/.idx"):
        data.parse_data_path([shards[0] + ".bin"])


def test_intact_shard_passes_the_checks(shards):
    assert data.parse_data_path(list(shards)) == (list(shards), None)


def test_read_only_data_dir_caches_in_user_dir(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ro" / "c_text_document")
    os.makedirs(os.path.dirname(prefix))
    write_shard(prefix, 1, 500, 100, seed=3)
    # Root ignores permission bits, so stand in for a read-only directory through os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    dataset = data.build_train_dataset([prefix], "1", SEQ, 10, 1, StubTokenizer())
    assert len(dataset) >= 10
    assert sorted(os.listdir(tmp_path / "ro")) == ["c_text_document.bin", "c_text_document.idx"]
    assert os.listdir(tmp_path / "user_cache" / "megatron_rmt" / "datasets")


def _replica_samples(prefix: str) -> tuple[int, list[int], list[int]]:
    """Runs in each gloo rank: build collectively, read two microbatches as this DP rank."""
    from megatron.core import parallel_state as ps

    dataset = build([prefix])
    it = data.MicrobatchIterator(
        dataset, 2, 8, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    )
    batches = [next(it) for _ in range(2)]
    ids = [i for b in batches for i in b["sample_ids"].tolist()]
    sums = [int(b["tokens"].sum()) for b in batches]
    return ps.get_data_parallel_rank(), ids, sums


def test_distributed_build_and_dp_split(shards):
    # Two gloo ranks, DP=2: the collective build (rank 0 writes the index cache, then the other
    # rank reads it) must give both the same dataset, each reading its own half of every step.
    # TP/PP peers share a dp_rank, so they get the same samples by the same arithmetic.
    (dp0, ids0, sums0), (dp1, ids1, sums1) = spawn(_replica_samples, 2, args=(shards[0],))
    assert (dp0, dp1) == (0, 1)
    assert sorted(ids0 + ids1) == list(range(8))
    dataset = build([shards[0]])
    for ids, sums in ((ids0, sums0), (ids1, sums1)):
        want = [sum(int(dataset[i]["tokens"].sum()) for i in ids[k : k + 2]) for k in (0, 2)]
        assert sums == want


def _enter_node(root: str, name: str, corpus: str | None) -> None:
    """Collective: work from `root/name` (a "node"), with a copy of `corpus` there as `data`
    when given; every rank has its files in place before any rank goes on."""
    node = os.path.join(root, name)
    os.makedirs(node, exist_ok=True)
    if corpus is not None:
        for ext in (".bin", ".idx"):
            shutil.copy(corpus + ext, os.path.join(node, "data" + ext))
    torch.distributed.barrier()
    os.chdir(node)


def _samples_on_nodes(corpus: str, root: str, own_filesystem: bool):
    """Runs in each gloo rank, from its own "node" directory (`own_filesystem`: a copy of the
    shard there, so no rank sees another's files) or from one shared directory: build the
    dataset from the relative prefix "data"; the node-cache builds this rank ran, its first
    samples' tokens and its cache directory's files."""

    from megatron_rmt import node_cache

    rank = torch.distributed.get_rank()
    _enter_node(root, f"node{rank}" if own_filesystem else "shared",
                corpus if rank == 0 or own_filesystem else None)  # fmt: skip
    builds, build_alone = [], node_cache.build_in_a_world_of_one
    node_cache.build_in_a_world_of_one = lambda kwargs: builds.append(1) or build_alone(kwargs)
    dataset = build(["data"])
    tokens = [dataset[i]["tokens"].tolist() for i in range(5)]
    return len(builds), tokens, sorted(os.listdir("cache"))


@pytest.mark.parametrize("own_filesystem", [True, False])
def test_every_node_gets_the_index_cache(shards, tmp_path, own_filesystem):
    """Megatron writes the cache on global rank 0 only: a node without a filesystem shared with
    it builds its own copy (before: rank 1 stopped with `No such file ... document_index.npy`),
    and a node that shares it builds nothing."""
    ranks = spawn(_samples_on_nodes, 2, args=(shards[0], str(tmp_path), own_filesystem))
    (builds0, tokens0, files0), (builds1, tokens1, files1) = ranks
    assert (builds0, builds1) == ((0, 1) if own_filesystem else (0, 0))
    assert tokens0 == tokens1  # the same windows from either node's cache
    assert files0 == files1 and any(f.endswith("document_index.npy") for f in files0)
    assert not any(f.startswith(".seen-by-rank0") for f in files0)  # the marker is gone


def _check_where_rank1_lacks_the_data(corpus: str, root: str):
    """Each rank in its own "node" directory; rank 1's has no data. What each rank's check says."""

    rank = torch.distributed.get_rank()
    _enter_node(root, f"node{rank}", corpus if rank == 0 else None)
    try:
        parallel.agree(lambda: data.parse_data_path(["data"]), data.DataError)
    except data.DataError as e:
        return str(e)
    return None


def test_a_shard_missing_on_one_node_stops_every_rank(shards, tmp_path):
    """Without agreement rank 0 would go on into the next collective and wait there for rank 1
    until the timeout (10-60 minutes); now both stop at once, naming rank 1 and its host."""
    errors = spawn(_check_where_rank1_lacks_the_data, 2, args=(shards[0], str(tmp_path)))
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 1 on ") and "no data.bin/.idx" in errors[0]
    assert "rank 0" not in errors[0]


def _build_where_rank1_cannot(corpus: str, root: str):
    """Each rank in its own "node" directory; rank 1's cache build fails (its interpreter exits
    with an error). What each rank's dataset build says."""
    from megatron_rmt import node_cache

    rank = torch.distributed.get_rank()
    _enter_node(root, f"node{rank}", corpus)
    if rank == 1:
        node_cache.sys.executable = "/bin/false"
    try:
        build(["data"])
    except data.UserError as e:
        return str(e)
    return None


def test_a_failed_node_cache_build_stops_every_rank(shards, tmp_path):
    errors = spawn(_build_where_rank1_cannot, 2, args=(shards[0], str(tmp_path)))
    assert errors[0] == errors[1] and errors[0] is not None
    assert errors[0].startswith("rank 1 on ") and "building the dataset index cache" in errors[0]
