"""No rollout reply can poison or crash training (issue 15, the rollout side).

- A fake vLLM-like server on loopback (http.server in a thread) answers real training steps with
  NaN, +inf or positive log-probs, ids outside the served vocabulary, negative ids, responses
  longer than max_tokens, the wrong number of choices and non-JSON bodies: each step must end
  with exactly the weights of an NTP-only step from the same state, and count the replies. One
  invalid reply among valid ones costs only its own request.
- Control routes (/health, /pause, /collective_rpc, /resume) answering HTTP errors, non-JSON or
  no HTTP at all are failures of that server, never of the run.
- A non-finite gradient on one rank skips the optimizer step on every rank, counted.
- With an API key, every route of a real vLLM server refuses requests without it (one server,
  started through the launcher, which then leaves no process behind).
"""

import http.server
import itertools
import json
import math
import signal
import threading
import urllib.error
import urllib.request

import psutil
import pytest
import torch
from conftest import missing
from distributed import spawn
from test_serve import launched, wait_group_gone
from test_train import ScriptedEngine, _flags
from test_vllm import _vllm_python, build_hf_model

from megatron_rmt import build, config, launch, parallel, train
from megatron_rmt.rollout import client
from megatron_rmt.rollout.contract import RolloutRequest

SERVED_VOCAB = 50257  # GPT-2's; the trainer's model pads it to 50304 rows


class FakeServer:
    """A vLLM stand-in on loopback: `answer(path, body)` gives (status, body bytes) for every
    request; status None sends the bytes raw, without any HTTP status line."""

    def __init__(self, answer):
        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = answer(self.path.split("?")[0], body)
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# What the fake server does to the first (rewarded) sample of every reply.
CORRUPTIONS = {
    "nan_logprob": lambda ids, lps, cap: (ids, [math.nan] + lps[1:]),
    "inf_logprob": lambda ids, lps, cap: (ids, [math.inf] + lps[1:]),
    "positive_logprob": lambda ids, lps, cap: (ids, [0.5] + lps[1:]),
    "id_past_served_vocab": lambda ids, lps, cap: ([SERVED_VOCAB] + ids[1:], lps),
    "huge_id": lambda ids, lps, cap: ([10**9] + ids[1:], lps),
    "negative_id": lambda ids, lps, cap: ([-5] + ids[1:], lps),
    "too_long": lambda ids, lps, cap: ((ids * cap)[: cap + 1], (lps * cap)[: cap + 1]),
}
BAD_REPLIES = [*CORRUPTIONS, "missing_choice", "not_json"]


def completion_answer(kind: str, body: dict, tokenizer) -> tuple[int, bytes]:
    """The fake server's /v1/completions reply of `kind` ("unavailable": HTTP 503; "valid": the
    scripted samples of test_train, which the RL pass trains on)."""
    if kind == "unavailable":
        return 503, b"overloaded"
    if kind == "not_json":
        return 200, b"<html>502 Bad Gateway</html>"
    req = RolloutRequest(
        body["prompt"], body["n"], body["max_tokens"], body["temperature"], body["top_p"],
        body["seed"],
    )  # fmt: skip
    (result,) = ScriptedEngine(tokenizer).generate([req])
    samples = list(zip(result.responses, result.logprobs, strict=True))
    if kind in CORRUPTIONS:
        samples[0] = CORRUPTIONS[kind](*samples[0], req.max_tokens)
    if kind == "missing_choice":
        samples = samples[1:]
    choices = [
        {"index": i, "token_ids": ids, "logprobs": {"token_logprobs": lps}}
        for i, (ids, lps) in enumerate(samples)
    ]
    return 200, json.dumps({"choices": choices}).encode()  # NaN and inf as JSON's NaN, Infinity


def one_step_per_reply(argv, kinds):
    """From the same initial state, one training step against the fake server for each kind of
    reply ("one_nan": only the first request the server sees gets "nan_logprob"): that step's
    metrics and resulting parameters."""
    cfg = config.parse(argv)
    out, current = {}, {}

    def answer(path, body):
        kind = current["kind"]
        if kind == "one_nan":
            kind = "nan_logprob" if next(current["calls"]) == 0 else "valid"
        return completion_answer(kind, body, current["tokenizer"])

    server = FakeServer(answer)
    try:
        for kind in kinds:
            parallel.seed_everything(cfg.parallel.seed, parallel.layout_of_this_rank())
            run = launch.setup(cfg)
            current.update(kind=kind, calls=itertools.count(), tokenizer=run.tokenizer)
            run.engine = client.VLLMEngine(
                [server.url], run.tokenizer.eod, retries=0, vocab_size=SERVED_VOCAB
            )
            metrics = train.train_step(run, 0)
            params = [p.detach().clone() for p in run.trainable.model[0].parameters()]
            out[kind] = (metrics, params)
    finally:
        server.close()
    return out


@pytest.mark.slow
def test_invalid_replies_leave_the_weights_of_an_ntp_only_step(tiny_corpus):
    argv = _flags(tiny_corpus, extra=["--clip-eps", "0.2"])  # NaN old log-probs reach the loss
    kinds = ["unavailable", "valid", "one_nan", *BAD_REPLIES]
    out = spawn(one_step_per_reply, 1, args=(argv, kinds))[0]
    ntp_metrics, ntp_params = out["unavailable"]  # the server failed: an NTP-only step
    assert ntp_metrics["rollout_failed"] == 1 and ntp_metrics["rollout_invalid"] == 0
    valid_metrics, valid_params = out["valid"]  # the test can tell: valid replies do train
    assert valid_metrics["rollout_failed"] == valid_metrics["rollout_invalid"] == 0
    assert valid_metrics["rollout_dropped"] == 0 and valid_metrics["rl_tokens_trained"] > 0
    requests = valid_metrics["rl_positions"]  # one request per chosen position
    assert ntp_metrics["rollout_dropped"] == requests > 1
    assert not all(torch.equal(a, b) for a, b in zip(valid_params, ntp_params, strict=True))
    for kind in BAD_REPLIES:
        metrics, params = out[kind]
        assert metrics["rollout_failed"] == 1, kind
        assert metrics["rollout_invalid"] == metrics["rollout_dropped"] == requests, kind
        assert metrics["rl_tokens"] == 0 and math.isfinite(metrics["grad_norm"]), kind
        for a, b in zip(params, ntp_params, strict=True):
            assert torch.isfinite(a).all() and torch.equal(a, b), kind
    # One invalid reply: the step trains on the other requests' samples, without that one.
    metrics, params = out["one_nan"]
    assert metrics["rollout_failed"] == 0 and metrics["rl_tokens_trained"] > 0
    assert metrics["rollout_invalid"] == metrics["rollout_dropped"] == 1
    assert metrics["rl_positions"] == requests - 1
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert not all(torch.equal(a, b) for a, b in zip(params, ntp_params, strict=True))


class _NoModelSync:
    """DiskWeightSync's protocol on one process, writing nothing: what sync_weights drives."""

    is_reloader = True

    def due(self, version):
        return True

    def write(self, version):
        return f"/nowhere/v{version}"

    def reload_from_rank0(self, reload):
        return reload()


CONTROL_ROUTES = ["/health", "/pause", "/collective_rpc", "/resume"]
BROKEN = {  # what a failing server may answer
    "http_500": (500, b"Internal Server Error"),
    "not_json": (200, b"<html>maintenance</html>"),
    "not_http": (None, b"\x00\x17garbage, no status line\r\n\r\n"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("route", CONTROL_ROUTES)
def test_a_broken_control_route_is_a_failure_of_that_server(route, broken):
    good = (200, json.dumps({"status": "ok"}).encode())
    server = FakeServer(lambda path, body: BROKEN[broken] if path == route else good)
    engine = client.VLLMEngine(
        [server.url], eos_id=0, retries=0, backoff_s=0.0, weights=_NoModelSync()
    )
    request = RolloutRequest([1, 2], n=1, max_tokens=2, temperature=1.0, top_p=1.0, seed=0)
    try:
        if route == "/health":
            with pytest.raises(client.RolloutError, match="unreachable"):
                engine.check_reachable()
            engine.sync_weights(1)  # /health is not part of a sync
            assert engine.loaded[server.url] == 1
        else:
            engine.check_reachable()
            engine.sync_weights(1)  # the run goes on without this server's weights
            assert engine.loaded[server.url] is None
            with pytest.raises(client.RolloutError, match="no rollout server holds"):
                engine.generate([request])  # retried its reload, failed again: not used
    finally:
        server.close()


def step_with_a_poisoned_gradient(argv):
    """One step whose gradient turns NaN on the last rank only (after the DP reduction, in one
    TP shard), then a clean step: parameters, metrics and LR-schedule progress of both."""
    run = launch.setup(config.parse(argv))
    run.engine = ScriptedEngine(run.tokenizer)
    params = lambda: [p.detach().clone() for p in run.trainable.model[0].parameters()]  # noqa: E731
    before, finalize = params(), build.finalize_model_grads

    def poisoned(model, num_tokens):
        finalize(model, num_tokens)
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            next(model[0].parameters()).main_grad.view(-1)[0] = math.nan

    build.finalize_model_grads = poisoned
    try:
        skipped = train.train_step(run, 0)
    finally:
        build.finalize_model_grads = finalize
    after_skip, lr_steps = params(), run.trainable.scheduler.num_steps
    grads_zero = all(
        not buffer.grad_data.any()
        for buffer in run.trainable.model[0].buffers
        + run.trainable.model[0].expert_parallel_buffers
    )
    clean = train.train_step(run, 1)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True))
    now = params()
    finite = all(bool(torch.isfinite(p).all()) for p in now)
    moved = any(not torch.equal(a, b) for a, b in zip(now, before, strict=True))
    return skipped, clean, unchanged, grads_zero, lr_steps, finite and moved


@pytest.mark.slow
def test_a_non_finite_gradient_skips_the_step_on_every_rank(tiny_corpus):
    argv = _flags(tiny_corpus, tp=2)
    # Ranks that disagreed on skipping would wait in different collectives: bounded, the run
    # then fails naming where each rank waits (the stacks the harness collects), well before
    # the harness's default. Unit test of the guard itself: test_gradient_guard.py.
    for skipped, clean, unchanged, grads_zero, lr_steps, trained in spawn(
        step_with_a_poisoned_gradient, 2, tp=2, args=(argv,), timeout=150
    ):
        assert skipped["skipped_step"] == 1 and math.isnan(skipped["grad_norm"])
        assert unchanged and grads_zero and lr_steps == 0  # no update, no LR progress
        assert clean["skipped_step"] == 0 and math.isfinite(clean["grad_norm"]) and trained


def _status(url: str, method: str, path: str, key: str | None) -> int:
    body = None if method == "GET" else b"{}"
    request = urllib.request.Request(url + path, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


# Every kind of route vLLM 0.32 serves: OpenAI API, health and metrics, the dev-mode control
# routes the disk sync drives, and the weight-transfer routes of GPU weight sync.
ROUTES = [
    ("GET", "/health"), ("GET", "/metrics"), ("GET", "/version"), ("GET", "/v1/models"),
    ("POST", "/v1/completions"), ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"),
    ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"), ("POST", "/update_weights"),
    ("POST", "/init_weight_transfer_engine"), ("POST", "/start_weight_update"),
    ("GET", "/no_such_route"),
]  # fmt: skip


@pytest.mark.slow
def test_api_key_guards_every_route_of_a_real_server(tmp_path):
    python, reason = _vllm_python()
    if python is None:
        missing("vLLM", f"{reason} (`make vllm-venv` builds .venv-vllm)")
    model_dir, key = str(tmp_path / "tiny_hf"), "test-key-0123"
    build_hf_model(model_dir, SERVED_VOCAB)
    args = ["--model", model_dir, "--python", python, "--api-key", key, "--startup-timeout", "300"]
    with launched(*args) as (launcher, url, group):
        server = psutil.Process(group)  # the group's leader
        assert key not in " ".join(server.cmdline())  # not readable by every local user
        for method, path in ROUTES:
            assert _status(url, method, path, None) == 401, path
            assert _status(url, method, path, "wrong-key") == 401, path
        assert _status(url, "GET", "/no_such_route", key) == 404  # the key lets requests in
        for path in ("/update_weights", "/init_weight_transfer_engine"):
            assert _status(url, "POST", path, key) != 401, path  # refused by vLLM, not the key
        with pytest.raises(client.RolloutError, match="401"):
            client.VLLMEngine([url], eos_id=50256).check_reachable()
        engine = client.VLLMEngine([url], eos_id=50256, api_key=key, vocab_size=SERVED_VOCAB)
        engine.check_reachable()
        assert engine.reload_server(url, model_dir, 7) == 7  # pause, reload, resume: all keyed
        request = RolloutRequest([464, 3139, 286], n=2, max_tokens=3, temperature=1.0,
                                 top_p=1.0, seed=0)  # fmt: skip
        assert len(engine.generate([request])[0].responses) == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
        assert wait_group_gone(group, 30) == [], "a process of the server outlived its launcher"
