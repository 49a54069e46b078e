"""The gloo weight transport against a fake server on loopback: a server that refuses its part of a
transfer ends the transfer as soon as it answers, not after the transfer's timeout; and a whole
push (PP 2 x DP 2, small buckets) delivers every tensor once, bit for bit the trainer's fp32
parameters, at each version.

Found in the full suite: a server restarted without `--weight-transfer gloo` answers
`/init_weight_transfer_engine` with HTTP 500 at once, but the trainer went on waiting for it to
join the gloo group, 30 s on every sync, and every step trained NTP-only."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
from distributed import spawn
from megatron.core import parallel_state as ps
from test_hardening_rollout import FakeServer

from megatron_rmt.build import build_trainable
from megatron_rmt.config import Config, ModelConfig
from megatron_rmt.model import hf_mapping
from megatron_rmt.rollout import client
from megatron_rmt.rollout.transports import GlooTransport, ShmTransport
from megatron_rmt.rollout.weight_transfer import MemoryWeightSync
from megatron_rmt_vllm import wire

TIMEOUT_S = 120.0  # what the trainer would wait before this fix
BOUND_S = 30.0  # a refusal ends the transfer well within it


def _call():
    return client.VLLMEngine(["http://127.0.0.1:1"], eos_id=0, retries=0)._call


def _timed(fn):
    start = time.monotonic()
    with pytest.raises(OSError) as caught:
        fn()
    return time.monotonic() - start, str(caught.value)


def test_a_server_without_the_backend_fails_the_connect_at_once():
    refusal = (500, b"Internal Server Error")
    server = FakeServer(lambda path, body: refusal if "weight_transfer" in path else (200, b"{}"))
    transport = GlooTransport(TIMEOUT_S, address="127.0.0.1")
    try:
        elapsed, message = _timed(lambda: transport.connect(server.url, _call(), workers=1))
    finally:
        server.close()
    assert elapsed < BOUND_S
    assert "--weight-transfer gloo" in message and "HTTP 500" in message
    assert server.url not in transport.groups


def _join_as_the_worker(info: dict):
    """What the server's one worker does on `/init_weight_transfer_engine`: join as rank 1."""
    store = wire.client_store(
        info["master_address"], info["master_port"], info["world_size"], TIMEOUT_S
    )
    return wire.open_group(store, 1, info["world_size"], TIMEOUT_S)


class JoinsThenRefusesUpdates:
    """Joins the trainer's group as its one worker (rank 1), then answers every
    `/update_weights` with HTTP 500 without receiving anything."""

    def __init__(self):
        self.group = None
        self.server = FakeServer(self.answer)

    def answer(self, path, body):
        if path == "/init_weight_transfer_engine":
            self.group = _join_as_the_worker(body["init_info"])
            return 200, b"{}"
        if path == "/update_weights":
            return 500, json.dumps({"error": "out of memory"}).encode()
        return 200, b"{}"


def test_an_update_the_server_refuses_fails_the_send_at_once():
    fake = JoinsThenRefusesUpdates()
    transport, call = GlooTransport(TIMEOUT_S, address="127.0.0.1"), _call()
    try:
        transport.connect(fake.server.url, call, workers=1)
        assert fake.group is not None  # the group is open on both sides
        tensors = [torch.randn(64, 64), torch.randn(7)]
        info, payload = transport.pack(["a", "b"], tensors)
        elapsed, message = _timed(lambda: transport.send(fake.server.url, info, payload, call))
    finally:
        fake.server.close()
    assert elapsed < BOUND_S
    assert "HTTP 500" in message and "out of memory" in message


def test_a_transfer_both_sides_complete_returns_its_result():
    """The other direction of the same helper: the server's call and the trainer's side both
    succeed (a real group, a real broadcast), and the bucket arrives intact."""
    received = {}

    def answer(path, body):
        if path == "/init_weight_transfer_engine":
            received["group"] = _join_as_the_worker(body["init_info"])
        elif path == "/update_weights":
            received.update(wire.receive(received["group"], body["update_info"]))
        return 200, b"{}"

    server = FakeServer(answer)
    transport, call = GlooTransport(TIMEOUT_S, address="127.0.0.1"), _call()
    tensors = [torch.randn(64, 64), torch.arange(5, dtype=torch.int64)]
    try:
        transport.connect(server.url, call, workers=1)
        transport.send(server.url, *transport.pack(["a", "b"], tensors), call)
    finally:
        server.close()
    assert torch.equal(received["a"], tensors[0]) and torch.equal(received["b"], tensors[1])


def test_buckets_hold_every_tensor_once_in_order():
    tensors = [(f"t{i}", torch.empty(n)) for i, n in enumerate([3, 1, 8, 2, 2, 2, 9, 1, 1, 4])]
    for bucket_bytes in (1, 4, 12, 16, 40, 1 << 30):  # bytes: fp32 elements x 4
        buckets = list(wire.buckets(tensors, bucket_bytes))
        names = [n for names, _ in buckets for n in names]
        assert names == [n for n, _ in tensors], bucket_bytes
        assert [t for _, b in buckets for t in b] == [t for _, t in tensors]
        for i, (_, bucket) in enumerate(buckets):
            size = sum(t.numel() * 4 for t in bucket)
            if i < len(buckets) - 1:  # full: closed by its last tensor
                assert size >= bucket_bytes > size - bucket[-1].numel() * 4, (bucket_bytes, i)


VOCAB = 256
BUCKET_BYTES = 20_000  # the model's matrices are 16-45 kB, its norms 256 B: buckets of 1 to 9


class ReceivingServer:
    """A vLLM server with one worker, as the gloo backend makes it: joins the trainer's group,
    receives each `/update_weights` bucket, reports the tag of the last finished update."""

    def __init__(self):
        self.group, self.tag, self.buckets = None, None, []
        self.server = FakeServer(self.answer)

    def answer(self, path, body):
        if path == "/weight_info":
            return 200, json.dumps({"weight_version": self.tag}).encode()
        if path == "/collective_rpc":  # check_health on every worker
            return 200, json.dumps({"results": [None]}).encode()
        if path == "/init_weight_transfer_engine":
            self.group = _join_as_the_worker(body["init_info"])
        elif path == "/start_weight_update":
            self.buckets = []
        elif path == "/update_weights":
            self.buckets.append(list(wire.receive(self.group, body["update_info"])))
        elif path == "/finish_weight_update":
            self.tag = body["weight_version"]
        return 200, b"{}"


def _compare_stage(trainable, m, received: dict) -> dict:
    """Each exported parameter of this rank's stage against the HF tensors that arrived, mapped
    back by the loader's own direction (hf_mapping.to_shard, not the export being tested)."""
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    verdicts = {}
    for name, param, rule in hf_mapping._stage_parameters(trainable.model[0]):
        missing = [n for n in rule.hf_names if n not in received]
        if missing:
            verdicts[name] = f"never arrived: {missing}"
            continue
        got = [received[n] for n in rule.hf_names]
        shard = hf_mapping.to_shard(rule, got, m, tuple(param.shape), tp_rank, tp)
        if {t.dtype for t in got} != {param.dtype}:
            verdicts[name] = f"arrived as {[t.dtype for t in got]}, trains as {param.dtype}"
        elif not torch.equal(shard, param.detach()):
            diff = (shard.double() - param.detach().double()).abs().max().item()
            verdicts[name] = f"differs by up to {diff:.3g}"
        else:
            verdicts[name] = "equal"
    return verdicts


def push_in_small_buckets():
    """Two pushes (v0, then v1 after an update) from every rank of a PP 2 x DP 2 trainer; what
    the server received, checked on every rank against its own parameters."""
    m = ModelConfig(num_layers=2)
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=m), VOCAB)
    fake = ReceivingServer() if dist.get_rank() == 0 else None
    urls = [fake.server.url] if fake else []  # only global rank 0 talks to servers
    transport = GlooTransport(TIMEOUT_S, address="127.0.0.1")
    sync = MemoryWeightSync(trainable.model, m, VOCAB, transport, bucket_bytes=BUCKET_BYTES)
    out = []
    try:
        for version in (0, 1):
            if version:  # an update, the same on both replicas of a stage
                gen = torch.Generator().manual_seed(ps.get_pipeline_model_parallel_rank())
                with torch.no_grad():
                    for p in trainable.model[0].parameters():
                        p.add_(0.01 * torch.randn(p.shape, generator=gen))
            held = sync.push(version, urls, _call())
            box = [fake.buckets if fake else None]
            dist.broadcast_object_list(box, src=0)
            buckets = [[(n, t.nbytes) for n, t in bucket] for bucket in box[0]]
            received = {n: t for bucket in box[0] for n, t in bucket}
            out.append((list(held.values()), buckets, _compare_stage(trainable, m, received)))
    finally:
        if fake:
            fake.server.close()
    return out


def test_a_push_in_small_buckets_delivers_the_trainers_exact_weights():
    ranks = spawn(push_in_small_buckets, 4, pp=2, timeout=180)
    expected = set(hf_mapping.hf_tensor_shapes(ModelConfig(num_layers=2), VOCAB))
    for version in (0, 1):
        held, buckets, _ = ranks[0][version]
        names = [n for bucket in buckets for n, _ in bucket]
        assert sorted(names) == sorted(expected), version  # every tensor, once
        assert held == [version]
        assert len(buckets) >= 8 and max(len(b) for b in buckets) > 1  # boundaries everywhere
        for bucket in buckets[:-1]:
            assert sum(size for _, size in bucket) >= BUCKET_BYTES
        for rank, out in enumerate(ranks):  # both stages, both replicas: fp32, bit for bit
            verdicts = out[version][2]
            assert verdicts and set(verdicts.values()) == {"equal"}, (version, rank, verdicts)


def test_the_shared_layout_keeps_every_tensor_apart_aligned_and_intact(tmp_path):
    tensors = [torch.randn(3, 5), torch.arange(7), torch.randn(11).bfloat16(), torch.ones(1)]
    offsets, end = wire.layout(tensors, start=3)
    spans = [(o, o + t.nbytes) for o, t in zip(offsets, tensors, strict=True)]
    assert all(o % wire.ALIGN == 0 for o in offsets) and offsets[0] >= 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)) and end == spans[-1][1]
    region = wire.shared_file(str(tmp_path / "w"), end, create=True)
    for t, o in zip(tensors, offsets, strict=True):
        wire.place(region, o, t.dtype, t.shape).copy_(t)
    info = {"names": list("abcd"), "offsets": offsets, **wire.describe(list("abcd"), tensors)}
    seen = dict(wire.read_shared(wire.shared_file(str(tmp_path / "w"), end), info))
    assert all(torch.equal(seen[n], t) for n, t in zip("abcd", tensors, strict=True))


def test_a_worker_never_maps_a_shared_file_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer on the server's host"):
        wire.shared_file(str(tmp_path / "absent"), 64)
    wire.shared_file(str(tmp_path / "small"), 32, create=True)
    with pytest.raises(FileNotFoundError, match="of 64 bytes"):
        wire.shared_file(str(tmp_path / "small"), 64)


def test_shm_refuses_a_server_on_another_host():
    with pytest.raises(ValueError, match="--weight-transfer gloo"):
        ShmTransport(TIMEOUT_S).connect("http://192.0.2.1:8000", _call(), workers=1)


class SharedMemoryServer(ReceivingServer):
    """A server on this host taking shm updates as vLLM's layerwise reload does: it keeps the
    views it is given (a layer is loaded once all its weights arrived, some only at
    `/finish_weight_update`) and copies them out only at the finish; each update takes a while,
    so the trainer copies the next bucket in meanwhile."""

    def answer(self, path, body):
        if path == "/start_weight_update":
            self.held = []
        elif path == "/update_weights":
            info = body["update_info"]
            key = (info["shm_path"], info["shm_bytes"])
            if getattr(self, "mapped", (None,))[0] != key:  # mapped once, as the worker does
                self.mapped = (key, wire.shared_file(*key))
            self.paths.add(info["shm_path"])
            time.sleep(0.05)
            self.held.append(list(wire.read_shared(self.mapped[1], info)))
            return 200, b"{}"
        elif path == "/finish_weight_update":
            self.buckets = [[(n, t.clone()) for n, t in bucket] for bucket in self.held]
        return super().answer(path, body)


def push_through_shared_memory():
    m = ModelConfig(num_layers=2)
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=m), VOCAB)
    fake = SharedMemoryServer()
    fake.paths = set()
    transport = ShmTransport(TIMEOUT_S, chunk_bytes=BUCKET_BYTES)  # one bucket, cut in calls
    sync = MemoryWeightSync(trainable.model, m, VOCAB, transport)
    out = []
    try:
        for version in (0, 1):
            if version:
                with torch.no_grad():
                    for p in trainable.model[0].parameters():
                        p.add_(0.01 * torch.randn(p.shape))
            held = sync.push(version, [fake.server.url], _call())
            received = {n: t for bucket in fake.buckets for n, t in bucket}
            out.append(
                (list(held.values()), len(fake.buckets), _compare_stage(trainable, m, received))
            )
    finally:
        fake.server.close()
    return out, sorted(fake.paths), [os.path.exists(p) for p in fake.paths]


def test_an_shm_push_delivers_the_trainers_exact_weights_and_leaves_no_file():
    """Every tensor of both versions bit for bit, though the server holds each bucket's views
    until the finish (a file reused within a sync would have been overwritten by then), through
    one file mapped once and unlinked after the first sync."""
    out, paths, left = spawn(push_through_shared_memory, 1, timeout=120)[0]
    for version, (held, n_buckets, verdicts) in enumerate(out):
        assert held == [version] and n_buckets >= 8
        assert verdicts and set(verdicts.values()) == {"equal"}, (version, verdicts)
    assert len(paths) == 1 and paths[0].startswith("/dev/shm/") and left == [False]
