"""The vLLM rollout path, measured side by side in one run:

1. sampling throughput (generated tokens/s) for the same token-id prompts through the project's
   HTTP client against a running server, and through vLLM's own offline `LLM.generate`;
2. weight sync time against writing the same tensors with `safetensors.save_file` alone: the
   client's sync through files and the previous recipe (write, then pause, reload,
   reset_prefix_cache, resume one after the other), each part timed alone, and the in-memory
   syncs (`--weight-transfer gloo`: no file; `shm`: a file in /dev/shm both sides map), side
   by side against the same server; and the floor under all of them: vLLM reloading the same
   tensors already in its worker's memory.

    python benchmarks/rollout.py --model tiny      # Qwen3, hidden 128, 4x32 heads, 2 layers
    python benchmarks/rollout.py --model smollm2   # SmolLM2-135M from the GGUF in assets
    python benchmarks/rollout.py --sync-only       # the weight sync part alone

The model starts as a Megatron model (random for `tiny`, the GGUF's weights for `smollm2`) and is
exported to the HF directory the server loads by the weight sync itself. Server and offline runs
use the same CPU settings (serve.CPU_ARGS / CPU_ENV) and run one after the other, never together,
on this 2-core machine. Needs $MEGATRON_RMT_VLLM_PYTHON (an interpreter with vLLM).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file

from megatron_rmt import config, parallel
from megatron_rmt.model import build_model, padded_vocab_size
from megatron_rmt.model.hf_config import hf_config_from_model_config, model_config_from_hf
from megatron_rmt.model.hf_mapping import load_hf_tensors_into_megatron, megatron_to_hf_tensors
from megatron_rmt.rollout.client import VLLMEngine
from megatron_rmt.rollout.contract import RolloutRequest
from megatron_rmt.rollout.serve import CPU_ENV, default_python, start_server
from megatron_rmt.rollout.transports import GlooTransport, ShmTransport
from megatron_rmt.rollout.weight_sync import DiskWeightSync
from megatron_rmt.rollout.weight_transfer import MemoryWeightSync

TINY_SHAPE = [
    "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--kv-channels", "32", "--num-layers", "2",
]  # fmt: skip
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GGUF = "/work/shared/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# An offline vLLM engine with the server's CPU settings, for the scripts below.
OFFLINE_LLM = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
a = json.loads(sys.argv[1])
llm = LLM(model=a["model"], enforce_eager=True, dtype="float32", max_model_len=1024,
          kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni",
          logprobs_mode="processed_logprobs", enable_chunked_prefill=False)
"""

OFFLINE = (
    OFFLINE_LLM
    + """
prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
params = [SamplingParams(n=a["n"], max_tokens=a["max_tokens"], temperature=1.0, seed=i,
                         logprobs=0, stop_token_ids=[a["eos"]], detokenize=False)
          for i in range(len(prompts))]
llm.generate(prompts, params, use_tqdm=False)
times, tokens = [], 0
for _ in range(a["reps"]):
    t = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    times.append(time.perf_counter() - t)
    tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
print("RESULT " + json.dumps({"tokens": tokens, "times": times}))
"""
)

# vLLM's own reload of the served weights from tensors already in the worker's memory: what any
# transport's update costs the server after the bytes arrived (the floor of every sync path).
RELOAD_FLOOR = (
    OFFLINE_LLM
    + """
def reload(worker):
    import glob, time
    from safetensors.torch import load_file
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload, initialize_layerwise_reload)
    model, tensors = worker.model_runner.model, {}
    for path in glob.glob(a["model"] + "/*.safetensors"):
        tensors.update(load_file(path))
    times, cpu = [], []
    for _ in range(a["reps"]):
        t, c = time.perf_counter(), time.process_time()
        initialize_layerwise_reload(model)
        model.load_weights(iter(tensors.items()))
        finalize_layerwise_reload(model, worker.model_runner.model_config)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # every thread of the worker
    return times, cpu
times, cpu = llm.collective_rpc(reload)[0]
print("RESULT " + json.dumps({"times": times, "cpu": cpu}))
"""
)


def megatron_model(kind: str):
    """(model chunk list, ModelConfig, HF vocab rows, eos id, HF config base, tokenizer writer)."""
    if kind == "tiny":
        m = config.parse(["--config", f"{ROOT}/configs/tiny_cpu.yaml", *TINY_SHAPE]).model
        vocab, eos, base = 50257, 50256, {"bos_token_id": 50256, "eos_token_id": 50256}
        model = build_model(m, padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1))

        def tokenizer(out):
            from transformers import GPT2TokenizerFast

            d = f"{ROOT}/corpus/gpt2_tokenizer"
            GPT2TokenizerFast(f"{d}/vocab.json", f"{d}/merges.txt").save_pretrained(out)

        return [model], m, vocab, eos, base, tokenizer
    from megatron_rmt.model.gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(SMOLLM2_GGUF)
    m = model_config_from_hf(ckpt.config)
    model = build_model(m, m.vocab_size, initialize=False)
    load_hf_tensors_into_megatron(model, m, ckpt.get_tensor)
    vocab, eos = ckpt.config["vocab_size"], ckpt.config["eos_token_id"]
    return [model], m, vocab, eos, ckpt.config, ckpt.save_tokenizer


def export_hf_dir(model, m, vocab, base, tokenizer, out: str) -> None:
    """The served directory: the weight sync's own files + config.json + tokenizer."""
    path = DiskWeightSync(model, m, vocab, os.path.join(out, "export")).write(0)
    for name in os.listdir(path):
        shutil.move(os.path.join(path, name), os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "export"))
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(hf_config_from_model_config(m, vocab, "float32", base=base), fh, indent=2)
    tokenizer(out)


def client_throughput(url, eos, prompts, n, max_tokens, reps):
    engine = VLLMEngine([url], eos, max_concurrency=len(prompts))
    reqs = [RolloutRequest(p, n, max_tokens, 1.0, 1.0, seed=i) for i, p in enumerate(prompts)]
    engine.generate(reqs)  # warm-up
    times, tokens = [], 0
    for _ in range(reps):
        t = time.perf_counter()
        results = engine.generate(reqs)
        times.append(time.perf_counter() - t)
        tokens = sum(len(x) for r in results for x in r.responses)
    return tokens, times


# The previous sync recipe's server calls after the write, in order.
BEFORE_CALLS = {
    "pause": "/pause?mode=wait",
    "reload": "/collective_rpc",
    "reset_prefix_cache": "/reset_prefix_cache",
    "resume": "/resume",
}


def sync_times(url, eos, model, m, vocab, sync_dir, reps, shm_chunk_bytes):
    """Medians over reps, against the same server, of:
    - `after`: the sync as the client runs it (`sync_weights`: the pause overlaps the write);
    - `before`: the previous recipe, one step after the other: write, pause, reload_weights,
      reset_prefix_cache, resume (each call also timed alone: `pause`, `reload`, ...);
    - `memory`: the in-memory sync (gloo transfer group, pause, start, update, finish, resume);
    - `shm`: the same through shared memory, one call per `shm_chunk_bytes`;
    - `gather` (the HF tensors from the Megatron model), `write` (`DiskWeightSync.write`:
      gather, save, rename, clean-up) and `save_file` of the same tensors alone.
    The four recipes rotate which goes first. Also returns the bytes written."""
    weights = DiskWeightSync(model, m, vocab, sync_dir)
    engine = VLLMEngine([url], eos, weights=weights)
    in_memory = VLLMEngine(
        [url], eos, weights=MemoryWeightSync(model, m, vocab, GlooTransport(120.0))
    )
    in_memory.sync_weights(0)  # opens the transfer group once, as a run does at its start
    in_shm = VLLMEngine(
        [url], eos,
        weights=MemoryWeightSync(model, m, vocab, ShmTransport(120.0, chunk_bytes=shm_chunk_bytes)),
    )  # fmt: skip
    in_shm.sync_weights(0)  # the server maps the shared file once
    tensors = {k: v.detach().clone() for k, v in megatron_to_hf_tensors(model[0], m, vocab)}
    keys = ("after", "before", "memory", "shm", "write", *BEFORE_CALLS, "gather", "save_file")
    times = {k: [] for k in keys}

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t)
        return out

    def after(v):
        timed("after", lambda: engine.sync_weights(v))
        if engine.loaded[url] != v:
            raise RuntimeError(f"server did not load v{v}")

    def before(v):
        start = time.perf_counter()
        path = timed("write", lambda: weights.write(1000 + v))
        body = {"method": "reload_weights", "kwargs": {"weights_path": path}}
        for key, route in BEFORE_CALLS.items():
            timed(key, lambda r=route: engine._call(url, r, body))
        times["before"].append(time.perf_counter() - start)

    def memory(v):
        timed("memory", lambda: in_memory.sync_weights(v))
        if in_memory.loaded[url] != v:
            raise RuntimeError(f"server did not take v{v} in memory")

    def shm(v):
        timed("shm", lambda: in_shm.sync_weights(v))
        if in_shm.loaded[url] != v:
            raise RuntimeError(f"server did not take v{v} through shared memory")

    recipes = [after, before, memory, shm]
    for v in range(reps):
        for recipe in recipes[v % 4 :] + recipes[: v % 4]:
            recipe(v)
        timed("gather", lambda: [t.contiguous() for _, t in megatron_to_hf_tensors(model[0], m)])
        plain = os.path.join(sync_dir, f"plain{v}")
        os.makedirs(plain)
        timed("save_file", lambda p=plain: save_file(tensors, os.path.join(p, "model.safetensors")))
        shutil.rmtree(plain)
    nbytes = sum(x.numel() * x.element_size() for x in tensors.values())
    return {k: statistics.median(x) for k, x in times.items()}, nbytes


def offline_vllm(script: str, **args) -> dict:
    """Run `script` (an OFFLINE_LLM script) in the vLLM interpreter; its RESULT line."""
    out = subprocess.run(
        [default_python(), "-c", script, json.dumps(args)],
        env=dict(os.environ, **CPU_ENV), capture_output=True, text=True, check=False,
    )  # fmt: skip
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"offline vLLM run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def offline_throughput(model_dir, eos, prompts, n, max_tokens, reps):
    r = offline_vllm(
        OFFLINE, model=model_dir, eos=eos, prompts=prompts, n=n, max_tokens=max_tokens, reps=reps
    )
    return r["tokens"], r["times"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="G samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sync-reps", type=int, default=15, help="repetitions of each sync recipe")
    p.add_argument("--sync-only", action="store_true", help="skip the throughput comparison")
    p.add_argument("--shm-chunk-mb", type=int, default=64, help="MiB per call of the shm sync")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parallel.init()
    work = tempfile.mkdtemp(prefix="rollout-bench-")
    client = offline = None
    try:
        model, m, vocab, eos, base, tokenizer = megatron_model(args.model)
        model_dir = os.path.join(work, "hf")
        os.makedirs(model_dir)
        export_hf_dir(model, m, vocab, base, tokenizer, model_dir)
        rng = random.Random(0)
        prompts = [
            [rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)
        ]
        t = time.perf_counter()
        server = start_server(model_dir, weight_transfer="gloo")
        startup = time.perf_counter() - t
        try:
            if not args.sync_only:
                client = client_throughput(
                    server.url, eos, prompts, args.n, args.max_tokens, args.reps
                )
            sync = sync_times(
                server.url, eos, model, m, vocab, os.path.join(work, "sync"), args.sync_reps,
                args.shm_chunk_mb << 20,
            )  # fmt: skip
        finally:
            server.stop()
        reloads = offline_vllm(RELOAD_FLOOR, model=model_dir, reps=args.sync_reps)
        floor = {k: statistics.median(reloads[k]) for k in ("times", "cpu")}
        if not args.sync_only:
            offline = offline_throughput(
                model_dir, eos, prompts, args.n, args.max_tokens, args.reps
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        parallel.destroy()
    print(f"model {args.model}, server start {startup:.1f} s")
    if client:
        report_throughput(args, client, offline)
    report_sync(args, *sync, floor)


def report_throughput(args, client, offline) -> None:
    rate = {
        k: v[0] / statistics.median(v[1]) for k, v in (("client", client), ("offline", offline))
    }
    print(f"{args.prompts} prompts x {args.prompt_tokens} tokens, n={args.n}, "
          f"max_tokens={args.max_tokens}, median of {args.reps}")  # fmt: skip
    print(f"{'path':<28}{'tokens':>8}{'tokens/s':>12}")
    print(f"{'HTTP client (VLLMEngine)':<28}{client[0]:>8}{rate['client']:>12.1f}")
    print(f"{'vLLM offline LLM.generate':<28}{offline[0]:>8}{rate['offline']:>12.1f}")
    print(f"client / offline: {rate['client'] / rate['offline']:.1%} (target >= 95%)")


def report_sync(args, t: dict, nbytes: int, reload: dict) -> None:
    ms = {k: v * 1e3 for k, v in t.items()}
    print(f"weight sync of {nbytes / 2**20:.1f} MiB, median of {args.sync_reps} (ms):")
    print("  parts alone: " + ", ".join(
        f"{k} {ms[k]:.1f}" for k in ("gather", "save_file", "write", *BEFORE_CALLS)))  # fmt: skip
    for key, what in (
        ("before", "write, pause, reload, reset_prefix_cache, resume in turn"),
        ("after", "sync_weights through files: pause during the write, no reset"),
        ("memory", "sync_weights in memory: gather, gloo transfer, no file"),
        ("shm", f"sync_weights through shared memory, {args.shm_chunk_mb} MiB a call"),
    ):
        print(f"  {key:<7}{ms[key]:>7.1f} ms = {t[key] / t['save_file']:.2f}x save_file  ({what})")
    print(f"  in memory / files: {t['memory'] / t['after']:.2f}x")
    floor = reload["times"]
    print(f"  floor: vLLM reloading the same tensors from its own memory (offline, no transfer) "
          f"{floor * 1e3:.1f} ms = {floor / t['save_file']:.2f}x save_file, using "
          f"{reload['cpu'] / floor:.2f} cores (CPU time {reload['cpu'] * 1e3:.1f} ms)")  # fmt: skip
    print(f"  in memory / floor: gloo {t['memory'] / floor:.2f}x, shm {t['shm'] / floor:.2f}x "
          "(target <= 1.2x)")  # fmt: skip
    print("  targets: files <= 3x save_file; in memory <= 1.5x save_file and below files")


if __name__ == "__main__":
    main()
