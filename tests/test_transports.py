"""The gloo weight transport against a fake server on loopback: a server that refuses its part of a
transfer ends the transfer as soon as it answers, not after the transfer's timeout.

Found in the full suite: a server restarted without `--weight-transfer gloo` answers
`/init_weight_transfer_engine` with HTTP 500 at once, but the trainer went on waiting for it to
join the gloo group, 30 s on every sync, and every step trained NTP-only."""

import json
import time

import pytest
import torch
from test_hardening_rollout import FakeServer

from megatron_rmt.rollout import client
from megatron_rmt.rollout.transports import GlooTransport
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
