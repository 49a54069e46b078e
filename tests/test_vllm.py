"""The vLLM rollout service against one real server per session (skipped without vLLM), and
the client's retries against a scripted HTTP server (always run).

The server runs a tiny Qwen3 (hidden 128, 4 heads of 32, 2 layers, GPT-2 vocabulary) built here
with `transformers` from the same shape flags the trainer gets, so the trainer's weights can be
synced into it. Point $MEGATRON_RMT_VLLM_PYTHON at an interpreter that has vLLM.

References are computed independently of the server: a `transformers` forward with a full-vocab
log-softmax for sampled log-probs, and the trainer's own recomputation (the RL pass's log-prob
gap) after a weight sync.
"""

import dataclasses
import http.server
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import rl_groups
import torch
from conftest import GPT2, ROOT, missing
from distributed import spawn

from megatron_rmt import config, launch, loop, problems, step, train
from megatron_rmt.rollout import client as client_mod
from megatron_rmt.rollout import engines
from megatron_rmt.rollout.contract import RolloutRequest
from megatron_rmt.rollout.serve import start_server

SHAPE = [
    "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--kv-channels", "32", "--num-layers", "2",
]  # fmt: skip
PROMPT = [464, 3139, 286, 4881, 318, 6342, 13, 383]  # "The capital of France is Paris. The"


def _vllm_python():
    python = os.environ.get("MEGATRON_RMT_VLLM_PYTHON")
    if not python or not os.access(python, os.X_OK):
        return None, "set MEGATRON_RMT_VLLM_PYTHON to an interpreter with vLLM installed"
    probe = [python, "-c", "import importlib.util as u; assert u.find_spec('vllm')"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return None, f"{python} cannot import vllm"
    return python, ""


def _check_plugin(python):
    """The gloo weight transfer is this project's vLLM plugin: the server's venv needs it."""
    probe = [python, "-c", "import megatron_rmt_vllm.gloo_engine"]
    if subprocess.run(probe, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT)).returncode:
        pytest.fail(f"{python} cannot import megatron_rmt_vllm: pip install --no-deps -e {ROOT}")


def _flags(corpus, extra=()):
    return [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2, *SHAPE, "--data-path", corpus,
        "--budget-initial", "4", "--max-response-tokens", "16", "--lr", "1e-3",
        "--group-size", "4", *extra,
    ]  # fmt: skip


def build_hf_model(out: str, vocab_size: int) -> None:
    """A randomly initialised HF model with the trainer's shape flags, plus GPT-2 tokenizer."""
    import transformers

    from megatron_rmt.model.hf_config import hf_config_from_model_config

    m = config.parse(["--config", f"{ROOT}/configs/tiny_cpu.yaml", *SHAPE]).model
    hf = hf_config_from_model_config(m, vocab_size, "float32")
    hf.update(bos_token_id=50256, eos_token_id=50256)
    arch = hf.pop("architectures")
    cfg = transformers.AutoConfig.for_model(**hf)
    cfg.architectures = arch
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok_dir = f"{ROOT}/corpus/gpt2_tokenizer"
    tok = transformers.GPT2TokenizerFast(f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt")
    tok.save_pretrained(out)


class Server:
    """The session's server; `pid` follows a restart done by the fault test."""

    def __init__(self, handle, model_dir, python):
        self.url, self.pid, self.model_dir, self.python = (
            handle.url,
            handle.process.pid,
            model_dir,
            python,
        )
        self.port = int(self.url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    python, reason = _vllm_python()
    if python is None:
        missing("vLLM", f"{reason} (`make vllm-venv` builds .venv-vllm)")
    model_dir = str(tmp_path_factory.mktemp("tiny_hf"))
    build_hf_model(model_dir, 50257)
    _check_plugin(python)
    handle = start_server(model_dir, python=python, weight_transfer="gloo")  # disk works too
    srv = Server(handle, model_dir, python)
    yield srv
    _kill_group(srv.pid, signal.SIGTERM)


def _kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    for _ in range(300):  # the server's group leader gone (it may be a child of another process)
        try:
            os.kill(pid, 0)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except (ChildProcessError, ProcessLookupError):
            return
        time.sleep(0.1)


def _reference_logprobs(model_dir, prompt, response, temperature):
    """log p(response_t | prompt, response_<t) at `temperature`, full-vocab softmax [len]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # [len(response), V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_samples_and_logprobs_match_a_full_vocab_reference(server):
    engine = client_mod.VLLMEngine([server.url], eos_id=50256)
    reqs = [
        RolloutRequest(PROMPT, n=4, max_tokens=6, temperature=0.7, top_p=1.0, seed=1),
        RolloutRequest(PROMPT[:5], n=3, max_tokens=5, temperature=1.0, top_p=1.0, seed=2),
    ]
    results = engine.generate(reqs)
    assert [len(r.responses) for r in results] == [4, 3]
    assert len({tuple(x) for x in results[0].responses}) > 1  # G distinct samples, not copies
    for req, res in zip(reqs, results, strict=True):
        assert res.weight_version == 0
        for tokens, logps in zip(res.responses, res.logprobs, strict=True):
            assert 1 <= len(tokens) <= req.max_tokens and len(logps) == len(tokens)
            ref = _reference_logprobs(server.model_dir, req.prompt_ids, tokens, req.temperature)
            torch.testing.assert_close(torch.tensor(logps), ref, atol=2e-4, rtol=0)
    # The same seed gives the same samples (reproducible rollouts).
    assert engine.generate(reqs[:1])[0].responses == results[0].responses


def test_stop_token_ends_a_sample_and_is_kept(server):
    engine = client_mod.VLLMEngine([server.url], eos_id=50256)
    greedy = RolloutRequest(PROMPT, n=1, max_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    tokens = engine.generate([greedy])[0].responses[0]
    stop_at = tokens[2]  # pretend the third greedy token is EOS
    cut = client_mod.VLLMEngine([server.url], eos_id=stop_at).generate([greedy])[0]
    assert cut.responses[0] == tokens[: tokens.index(stop_at) + 1]


def test_unreachable_server_fails_clearly_and_bad_urls_are_retried(server):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(client_mod.RolloutError, match="unreachable"):
        client_mod.VLLMEngine([dead], eos_id=50256, timeout=5).check_reachable()
    req = RolloutRequest(PROMPT, n=2, max_tokens=3, temperature=1.0, top_p=1.0, seed=0)
    spread = client_mod.VLLMEngine([dead, server.url], eos_id=50256, retries=1, backoff_s=0.01)
    assert all(len(r.responses) == 2 for r in spread.generate([req] * 4))  # retried elsewhere
    alone = client_mod.VLLMEngine([dead], eos_id=50256, retries=1, backoff_s=0.01)
    with pytest.raises(client_mod.RolloutError, match="after 2 attempts"):
        alone.generate([req])


def _setup_with_vllm(argv, url, sync_dir):
    """A trainer run set up with the embedded engine and, separately, the vLLM engine for it
    (so a test decides when the first weight sync happens)."""
    run = launch.setup(config.parse(argv))
    cfg = config.parse([*argv, "--rollout-url", url, "--weight-sync-dir", sync_dir])
    return run, engines.build_engine(cfg, run.trainable, run.tokenizer, 50257)


class _ScriptedHTTP(http.server.BaseHTTPRequestHandler):
    """Answers /v1/completions from the class's `replies` in turn: a dict is sent as JSON, a
    number is a hang of that many seconds."""

    replies: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = type(self).replies.pop(0)
        if not isinstance(reply, dict):
            time.sleep(reply)
            reply = {}
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _choice(index, ids, logprobs):
    return {"index": index, "token_ids": ids, "logprobs": {"token_logprobs": logprobs}}


def test_garbage_and_hangs_are_retried_then_raise():
    good = {"choices": [_choice(1, [7], [-0.5]), _choice(0, [5, 6], [-1.0, -2.0])]}
    short = {"choices": [_choice(0, [5, 6], [-1.0, -2.0])]}  # n=2 asked, one came back
    unequal = {"choices": [_choice(0, [5, 6], [-1.0]), _choice(1, [7], [-0.5])]}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHTTP)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    req = RolloutRequest([1, 2], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    engine = client_mod.VLLMEngine([url], eos_id=0, timeout=0.5, retries=3, backoff_s=0.01)
    try:
        _ScriptedHTTP.replies = [short, unequal, 2.0, good]  # garbage, garbage, a hang, then fine
        (result,) = engine.generate([req])
        assert result.responses == [[5, 6], [7]] and result.logprobs == [[-1.0, -2.0], [-0.5]]
        _ScriptedHTTP.replies = [short] * 4
        with pytest.raises(client_mod.RolloutError, match="asked for 2 samples"):
            engine.generate([req])
    finally:
        httpd.shutdown()


def _perturb(run, seed):
    """Weights the server has never held (each test run of the trainer starts from the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in run.trainable.model[0].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))


def sync_and_compare(argv, url, sync_dir, seed):
    """Greedy output before/after syncing the trainer's weights, and the trainer's log-prob gap
    on samples vLLM draws from the synced weights."""
    run, engine = _setup_with_vllm(argv, url, sync_dir)
    _perturb(run, seed)
    # Longer than a KV block: the server caches its prefix under the old weights, and a reload
    # that kept that cache would serve old keys and values after the sync (a large gap).
    prompt = PROMPT * 20
    greedy = RolloutRequest(prompt, n=1, max_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    frozen = client_mod.VLLMEngine([url], eos_id=run.tokenizer.eod)
    before = frozen.generate([greedy])[0].responses[0]
    torch.distributed.barrier()  # no rank still sampling when rank 0 pauses the server to sync
    run.engine = engine
    run.engine.sync_weights(0)
    after = run.engine.generate([greedy])[0].responses[0]
    files = sorted(os.listdir(run.engine.weights_path)) if run.engine.weights_path else None
    req = RolloutRequest(prompt, n=4, max_tokens=6, temperature=1.0, top_p=1.0, seed=3)
    results = run.engine.generate([req])
    groups = rl_groups.rows([req], results, torch.ones(1, 4), pad_id=run.tokenizer.eod)
    out = step.rl_pass(run.trainable, groups, 1.0, rl_groups.settings(chunk_tokens=1024))
    return before, after, files, out.logprob_gap_sum / out.tokens, results[0].weight_version


@pytest.mark.parametrize("transfer", ["disk", "gloo"])
def test_weight_sync_serves_the_trainers_weights(server, tiny_corpus, tmp_path, transfer):
    argv = _flags(
        tiny_corpus, ["--pipeline-model-parallel-size", "2", "--weight-transfer", transfer]
    )
    args = (argv, server.url, str(tmp_path / "sync"), {"disk": 1, "gloo": 2}[transfer])
    for before, after, files, gap, version in spawn(sync_and_compare, 2, pp=2, args=args):
        if transfer == "disk":  # both stages
            assert files == ["stage000-00000.safetensors", "stage001-00000.safetensors"]
        else:  # both stages' weights went through rank 0's transfer group; nothing was written
            assert files is None and not os.path.exists(tmp_path / "sync")
        assert before != after  # the served weights changed
        assert version == 0
        # vLLM's log-probs are the trainer's own, up to the trainer's softmax also covering the
        # 47 padded vocabulary rows (vLLM serves the real 50257); computed on the last stage,
        # broadcast to the first.
        assert 0 < gap < 2e-3


def push_then_reload(argv, url, sync_dir, transfer="gloo"):
    """The same new weights in memory (`transfer`), then through files: what the server samples
    (tokens and log-probs) before and after each."""
    run = launch.setup(config.parse(argv))
    _perturb(run, {"gloo": 3, "shm": 4}[transfer])  # not what the other test left served
    req = RolloutRequest(PROMPT * 3, n=4, max_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    served = [client_mod.VLLMEngine([url], eos_id=run.tokenizer.eod).generate([req])[0]]
    for path in (transfer, "disk"):
        torch.distributed.barrier()  # no rank still sampling when rank 0 pauses the server
        cfg = config.parse([*argv, "--rollout-url", url, "--weight-sync-dir", sync_dir,
                            "--weight-transfer", path])  # fmt: skip
        engine = engines.build_engine(cfg, run.trainable, run.tokenizer, 50257)
        engine.sync_weights(0)
        served.append(engine.generate([req])[0])
    return served


@pytest.mark.parametrize("transfer", ["gloo", "shm"])
def test_in_memory_push_loads_the_same_bits_as_the_file_reload(
    server, tiny_corpus, tmp_path, transfer
):
    """fp32 end to end, at PP 2 (the second stage's tensors reach the server through rank 0) in
    1 MiB buckets (the 26 MB embedding alone in one, each layer over two): if any weight
    differed by one bit between the two paths, or a bucket boundary lost a tensor (the server
    would keep its old value), the sampled log-probs (and likely the tokens) would differ too.
    shm: vLLM keeps the views of layers it has not finished (the padded vocabulary's until
    `/finish_weight_update`), so a shared file reused within the sync would show here.
    That what is pushed is bit for bit the trainer's weights: test_transports.py."""
    argv = _flags(tiny_corpus, ["--pipeline-model-parallel-size", "2",
                                "--weight-transfer-bucket-mb", "1"])  # fmt: skip
    for before, pushed, reloaded in spawn(
        push_then_reload, 2, pp=2, args=(argv, server.url, str(tmp_path / "sync"), transfer)
    ):
        assert pushed.logprobs != before.logprobs  # the push changed what the server holds
        assert pushed.responses == reloaded.responses
        assert pushed.logprobs == reloaded.logprobs  # exactly equal floats


def push_then_die(argv):
    """A trainer that opens its transfer group, pushes v0 (set-up), and is killed."""
    launch.setup(config.parse(argv))
    os.kill(os.getpid(), signal.SIGKILL)


def rmt_run(argv):
    problems.score = _alternating_rewards(problems.score)  # this worker process only
    loop.run_steps(launch.setup(config.parse(argv)), train.train_step)


def test_a_new_trainer_replaces_the_transfer_group_of_a_killed_one(server, tiny_corpus, tmp_path):
    """The server still holds the group of a trainer that died without closing it; the next
    trainer's `/init_weight_transfer_engine` replaces it: every step samples from its weights."""
    metrics = str(tmp_path / "m.jsonl")
    argv = _flags(tiny_corpus, ["--rollout-url", server.url, "--weight-transfer", "gloo",
                                "--rollout-timeout", "5", "--train-iters", "2"])  # fmt: skip
    with pytest.raises(RuntimeError, match="exit code -9"):
        spawn(push_then_die, 1, args=(argv,))
    spawn(rmt_run, 1, args=([*argv, "--metrics-file", metrics],))
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == [0, 1]
    for m in rows:
        assert m["rollout_failed"] == 0 and m["rl_positions"] > 0
        assert 0 < m["logprob_gap"] < 2e-3  # sampled from this trainer's pushes


@pytest.mark.gpu
def test_nccl_push_loads_the_same_bits_as_the_file_reload(tiny_corpus, tmp_path):
    """vLLM's own nccl backend on a GPU server (written from vLLM 0.32's sources; not run on the
    CPU machine this was developed on)."""
    python, reason = _vllm_python()
    if python is None:
        missing("vLLM", f"{reason} (`make vllm-venv` builds .venv-vllm)")
    model_dir = str(tmp_path / "hf")
    build_hf_model(model_dir, 50257)
    handle = start_server(model_dir, python=python, device="gpu", weight_transfer="nccl",
                          extra_args=("--dtype", "float32"))  # fmt: skip
    try:
        args = (_flags(tiny_corpus), handle.url, str(tmp_path / "sync"), "nccl")
        before, pushed, reloaded = spawn(push_then_reload, 1, args=args)[0]
    finally:
        handle.stop()
    assert pushed.logprobs != before.logprobs
    assert pushed.responses == reloaded.responses and pushed.logprobs == reloaded.logprobs


class FaultyService:
    """Wraps the real engine: at step `kill_at` the server is killed before the rollouts, at
    `restart_at` it is started again (with its original weights) on the same port. Each happens
    once, whatever the number of `generate` calls and threads in that step."""

    collective = False

    def __init__(self, inner, server_pid, kill_at, restart_at, model_dir, python, port):
        self.inner, self.pid, self.kill_at, self.restart_at = inner, server_pid, kill_at, restart_at
        self.model_dir, self.python, self.port = model_dir, python, port
        self.lock, self.done = threading.Lock(), set()

    def sync_weights(self, version):
        self.inner.sync_weights(version)

    def generate(self, requests):
        with self.lock:
            version = self.inner.version
            if version == self.kill_at and "kill" not in self.done:
                _kill_group(self.pid, signal.SIGKILL)
                self.done.add("kill")
            if version == self.restart_at and "restart" not in self.done:
                handle = start_server(  # as the session started it: later tests push in memory
                    self.model_dir, python=self.python, port=self.port, weight_transfer="gloo"
                )
                self.pid = handle.process.pid
                self.done.add("restart")
        return self.inner.generate(requests)


def _alternating_rewards(real_score):
    """A random model never writes a parseable answer, so every reward would be 0 and the RL
    pass (where the log-prob gap is measured) would train nothing: keep the real scoring, then
    reward every other sample so each group has advantages."""

    def score(*args, **kwargs):
        scored = real_score(*args, **kwargs)
        pattern = (torch.arange(scored.rewards.shape[-1]) % 2 == 0).to(scored.rewards.dtype)
        return dataclasses.replace(scored, rewards=pattern.expand_as(scored.rewards).clone())

    return score


def rmt_run_with_faults(argv, sync_dir, server_pid, model_dir, python, port):
    url = f"http://127.0.0.1:{port}"
    problems.score = _alternating_rewards(problems.score)  # this worker process only
    run, engine = _setup_with_vllm(argv, url, sync_dir)
    engine.retries, engine.backoff_s = 1, 0.05
    run.engine = FaultyService(engine, server_pid, 2, 3, model_dir, python, port)
    run.engine.sync_weights(0)
    loop.run_steps(run, train.train_step)
    return run.engine.pid


def test_rmt_run_survives_a_server_crash_and_recovers(server, tiny_corpus, tmp_path):
    metrics = str(tmp_path / "m.jsonl")
    argv = _flags(tiny_corpus, ["--train-iters", "5", "--metrics-file", metrics])
    args = (argv, str(tmp_path / "sync"), server.pid, server.model_dir, server.python, server.port)
    # Restarts the server inside the run: more than spawn's default bound on a loaded machine.
    server.pid = spawn(rmt_run_with_faults, 1, args=args, timeout=900)[0]  # restarted, for teardown
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == [0, 1, 2, 3, 4]
    assert [m["rollout_failed"] for m in rows] == [0, 0, 1, 0, 0]
    assert rows[-1]["rollout_failures"] == 1
    for m in rows:
        if m["rollout_failed"]:
            assert m["rl_positions"] == 0 and m["ntp_tokens"] > 0  # trained NTP-only
        else:  # rollouts from the synced weights (after the restart too): a small gap
            assert m["rl_positions"] > 0 and m["rl_tokens_trained"] > 0
            assert 0 < m["logprob_gap"] < 2e-3


def setup_from_flags(argv):
    """What `--rollout-url` gives a user: launch.setup builds the vLLM engine and syncs v0."""
    run = launch.setup(config.parse(argv))
    req = RolloutRequest(PROMPT, n=2, max_tokens=3, temperature=1.0, top_p=1.0, seed=0)
    return type(run.engine).__name__, run.engine.generate([req])[0].weight_version


def test_rollout_url_flag_selects_the_vllm_engine(server, tiny_corpus, tmp_path):
    argv = _flags(tiny_corpus, ["--rollout-url", server.url, "--weight-sync-dir", str(tmp_path)])
    assert spawn(setup_from_flags, 1, args=(argv,))[0] == ("FleetEngine", 0)


def rmt_run_data_parallel(argv):
    """An RMT run through `--rollout-url`, recording on this rank what reached the service: the
    rollouts it asked for, the calls it made to the server and the weight files it wrote."""
    from megatron.core import parallel_state as ps

    from megatron_rmt.rollout import weight_sync

    problems.score = _alternating_rewards(problems.score)  # this worker process only
    record = {"dp": ps.get_data_parallel_rank(), "generate": [], "calls": [], "saved": []}
    record["gathers"] = 0
    generate, call = client_mod.VLLMEngine.generate, client_mod.VLLMEngine._call
    save, gather = weight_sync.save_file, weight_sync.megatron_to_hf_tensors

    def recorded_generate(self, requests):
        results = generate(self, requests)
        for r in results:  # calls may come one request at a time, from several threads
            record["generate"].append((r.weight_version, sum(len(x) for x in r.responses)))
        return results

    def recorded_call(self, url, path, body, *args, **kwargs):
        if path != "/v1/completions":
            record["calls"].append((path, ((body or {}).get("kwargs") or {}).get("weights_path")))
        return call(self, url, path, body, *args, **kwargs)

    def recorded_save(tensors, filename, *args, **kwargs):
        record["saved"].append(os.path.relpath(filename, sync_dir))
        return save(tensors, filename, *args, **kwargs)

    def recorded_gather(*args, **kwargs):
        record["gathers"] += 1
        return gather(*args, **kwargs)

    sync_dir = argv[argv.index("--weight-sync-dir") + 1]
    client_mod.VLLMEngine.generate, client_mod.VLLMEngine._call = recorded_generate, recorded_call
    weight_sync.save_file, weight_sync.megatron_to_hf_tensors = recorded_save, recorded_gather
    loop.run_steps(
        launch.setup(config.parse(argv)), train.train_step
    )  # setup syncs v0, each step t syncs v(t+1)
    return record


def _check_data_parallel_run(ranks, metrics, sync_dir, steps, dp):
    """Both replicas sampled and their RL tokens count; weights written and reloaded once per
    version, by one rank; every rollout from the newest weights; a small log-prob gap."""
    callers = [r for r in ranks if r["generate"]]
    assert sorted(r["dp"] for r in callers) == list(range(dp))  # one caller per replica
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == list(range(steps))
    for r in callers:  # every result came from the weights of its step's sync
        assert sorted({v for v, _ in r["generate"]}) == list(range(steps))
    for t, m in enumerate(rows):
        tokens = [sum(n for v, n in r["generate"] if v == t) for r in callers]
        assert all(n > 0 for n in tokens)  # every replica sampled at step t
        assert m["rl_tokens"] == sum(tokens)  # and the RL pass counted all of them
        assert m["rollout_failed"] == 0 and m["rl_positions"] > 0 and m["rl_tokens_trained"] > 0
        assert 0 < m["logprob_gap"] < 2e-3
    versions = range(steps + 1)
    assert ranks[0]["saved"] == [f"v{v}.partial/stage000-00000.safetensors" for v in versions]
    reload = [("/pause?mode=wait", None), ("/collective_rpc", None), ("/resume", None)]
    expected = [
        (path, f"{sync_dir}/v{v}" if path == "/collective_rpc" else None)
        for v in versions
        for path, _ in reload
    ]
    assert [c for c in ranks[0]["calls"] if c[0] != "/health"] == expected
    for r in ranks[1:]:  # no other rank wrote or reloaded; the other replica did not gather
        assert r["saved"] == [] and [c for c in r["calls"] if c[0] != "/health"] == []
    assert [r["gathers"] for r in ranks] == [steps + 1 if r["dp"] == 0 else 0 for r in ranks]
    assert os.listdir(sync_dir) == [f"v{steps}"]


@pytest.mark.parametrize("tp", [1, 2])
def test_rmt_run_with_two_replicas(server, tiny_corpus, tmp_path, tp):
    steps, sync_dir, metrics = 3, str(tmp_path / "sync"), str(tmp_path / "m.jsonl")
    argv = _flags(tiny_corpus, [
        "--train-iters", str(steps), "--metrics-file", metrics, "--rollout-url", server.url,
        "--weight-sync-dir", sync_dir, "--tensor-model-parallel-size", str(tp),
    ])  # fmt: skip
    ranks = spawn(rmt_run_data_parallel, 2 * tp, tp=tp, args=(argv,), timeout=600)
    _check_data_parallel_run(ranks, metrics, sync_dir, steps, dp=2)


def evaluate_through_vllm(flags, url, tmp):
    """`evaluate run --rollout-url`: build a set with a fresh checkpoint as proxy, evaluate that
    checkpoint through the server, then ask the server for log-probs of a sample and recompute
    them with the checkpoint: the server must serve exactly the evaluated weights."""
    from megatron_rmt import checkpoint, evaluate
    from megatron_rmt.evaluation import forward

    args, cfg = evaluate.parse(["build-set", "--eval-data", "x", "--output", "x", *flags])
    tokenizer, model = forward.tokenizer_and_model(cfg)
    with torch.no_grad():  # weights the server has never held
        for p in model[0].parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint.save_model(f"{tmp}/ckpt", model[0], cfg)
    with open(f"{ROOT}/corpus/sample_math.jsonl") as src, open(f"{tmp}/held.jsonl", "w") as dst:
        dst.writelines(src.readline() for _ in range(4))
    load = ["--load", f"{tmp}/ckpt"]
    args, cfg = evaluate.parse(["build-set", "--eval-data", f"{tmp}/held.jsonl", "--output",
                                f"{tmp}/set.jsonl", "--per-level", "2", *flags, *load])  # fmt: skip
    evaluate.build_set(args, cfg)
    args, cfg = evaluate.parse(["run", "--eval-set", f"{tmp}/set.jsonl", "--output",
                                f"{tmp}/vllm.json", "--samples", "2", *flags, *load,
                                "--rollout-url", url, "--weight-sync-dir", f"{tmp}/sync"])  # fmt: skip
    results = evaluate.run(args, cfg)
    engine = client_mod.VLLMEngine([url], tokenizer.eod)
    req = RolloutRequest(PROMPT, n=1, max_tokens=4, temperature=1.0, top_p=1.0, seed=1)
    served = engine.generate([req])[0]
    ids = torch.tensor([PROMPT + served.responses[0]])
    with torch.no_grad():
        logits = model[0](ids, torch.arange(ids.shape[1])[None], None)[0, len(PROMPT) - 1 : -1]
    logp = torch.log_softmax(logits[:, :50257], -1)  # the served vocabulary: no padding rows
    ours = logp.gather(1, torch.tensor(served.responses[0])[:, None]).squeeze(1)
    gap = (ours - torch.tensor(served.logprobs[0])).abs().max().item()
    return results, gap


def test_evaluate_ntr_through_the_server(server, tmp_path):
    flags = [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2, *SHAPE, "--bucket-mode", "quantile",
        "--min-context", "4", "--max-response-tokens", "6", "--budget-initial", "1",
        "--answer-tokens", "2",
    ]  # fmt: skip
    results, gap = spawn(evaluate_through_vllm, 1, args=(flags, server.url, str(tmp_path)))[0]
    assert gap < 1e-3  # the server samples from the evaluated checkpoint
    assert results["settings"]["samples"] == 2
    everything = results["ntr"]["all"]
    assert everything["n"] == 6 and 0 < everything["response_tokens"] <= 6
    assert 0 <= everything["accuracy"] <= 1


def posttrain_through_vllm(argv):
    """Math post-training with `--rollout-url`; every other sample is rewarded (a random model
    never solves anything) so the RL pass runs and measures the log-prob gap."""
    from megatron_rmt import posttrain

    problems.score_responses = _alternating_rewards(problems.score_responses)  # this worker only
    posttrain.main(argv)


def test_math_posttraining_through_the_server(server, tmp_path):
    data, metrics = tmp_path / "math.jsonl", str(tmp_path / "m.jsonl")
    data.write_text("".join(json.dumps({"problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))  # fmt: skip
    argv = [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", f"{ROOT}/configs/posttrain_tiny_cpu.yaml",
        *GPT2, *SHAPE, "--prompt-data", str(data), "--train-iters", "2",
        "--max-response-tokens", "8", "--metrics-file", metrics, "--rollout-url", server.url,
        "--weight-sync-dir", str(tmp_path / "sync"),
    ]  # fmt: skip
    spawn(posttrain_through_vllm, 1, args=(argv,))
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == [0, 1]
    for m in rows:
        assert m["rollout_failed"] == 0 and m["rl_tokens_trained"] > 0
        assert 0 < m["logprob_gap"] < 2e-3  # sampled from the weights synced after each step


class HangsMidRun:
    """Wraps the run's engine: SIGSTOP the server's process group at step `stop_at` right after
    the fleet's probe found it healthy (so its requests hang in flight), SIGCONT it before step
    `cont_at`'s rollouts."""

    collective = False

    def __init__(self, inner, server_pid, stop_at, cont_at):
        self.inner, self.pid, self.stop_at, self.cont_at = inner, server_pid, stop_at, cont_at
        self.lock, self.done = threading.Lock(), set()

    def sync_weights(self, version):
        self.inner.sync_weights(version)

    def metrics(self):
        return self.inner.metrics()

    def generate(self, requests):
        with self.lock:
            if self.inner.version == self.stop_at and "stop" not in self.done:
                self.inner.check = self._check_then_stop
                self.done.add("stop")
            if self.inner.version == self.cont_at and "cont" not in self.done:
                os.killpg(self.pid, signal.SIGCONT)
                self.done.add("cont")
        return self.inner.generate(requests)

    def _check_then_stop(self):
        del self.inner.check  # the class's own from now on
        self.inner.check()
        os.killpg(self.pid, signal.SIGSTOP)


def rmt_run_with_a_hung_server(argv, server_pid):
    problems.score = _alternating_rewards(problems.score)  # this worker process only
    run = launch.setup(config.parse(argv))
    run.engine = HangsMidRun(run.engine, server_pid, 2, 4)
    try:
        loop.run_steps(run, train.train_step)
    finally:
        os.killpg(server_pid, signal.SIGCONT)  # the session's server must outlive a failure


@pytest.mark.slow
def test_a_hung_server_costs_one_timeout_per_step_and_rl_resumes(server, tiny_corpus, tmp_path):
    """In memory (gloo), timeout 3 s, one retry: step 2's requests hang on the stopped server
    (two timeouts, then NTP-only, and the sync skips it), step 3's probe finds it down, step 4
    finds it back but stale (it is pushed the weights at that step's sync), steps 5-6 sample."""
    timeout, retries, metrics = 3.0, 1, str(tmp_path / "m.jsonl")
    argv = _flags(tiny_corpus, [
        "--train-iters", "7", "--metrics-file", metrics, "--rollout-url", server.url,
        "--weight-transfer", "gloo", "--rollout-timeout", str(timeout),
        "--rollout-retries", str(retries),
    ])  # fmt: skip
    spawn(rmt_run_with_a_hung_server, 1, args=(argv, server.pid))
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == list(range(7))
    assert [m["rollout_failed"] for m in rows] == [0, 0, 1, 1, 1, 0, 0]
    assert [m["rollout_servers_down"] for m in rows] == [0, 0, 1, 1, 0, 0, 0]
    healthy = max(m["step_time"] for m in rows if not m["rollout_failed"])
    bound = timeout * (retries + 1) + 3.0  # + a few seconds: backoff, the probe's timeout
    for m in rows:
        assert m["step_time"] < healthy + bound
        if not m["rollout_failed"]:  # RL resumed from the current weights
            assert m["rl_positions"] > 0 and 0 < m["logprob_gap"] < 2e-3
