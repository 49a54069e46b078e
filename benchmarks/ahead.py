"""On-policy vs one-step-ahead rollouts with a real vLLM server, same steps, same windows.

Starts one CPU vLLM server (tiny Qwen3: hidden 128, 4 heads of 32, 2 layers, GPT-2 vocabulary;
the weights pushed in memory after every step, over gloo or `--weight-transfer shm`), then
trains the same model three times from the same seed on the same windows: NTP only
(`--rmt-variant ntp`), RMT on-policy and RMT one step ahead (`--rollout-ahead 1`). Prints per
run the medians over the steps after the first (warm-up) of the step time and its split: NTP
pass, rollout wait after it, RL update, weight sync; and each RMT run's step time over the
NTP-only one. The randomly initialised model never writes a parseable answer, so every reward
would be 0 and the RL pass would skip every group: as tests/test_vllm.py does, the trainer
keeps the real scoring and then rewards every other sample, so every group trains.

With `--load CKPT` the three runs train a real checkpoint instead, with its real rewards (e.g.
the effect experiment's SmolLM2 cold start, docs/results_smollm2.md): `--hf` names the model
the server starts from (every run pushes its own weights first), `--data-path` the shards,
`--config` the run's presets (tokenizer: the checkpoint's own files).

Cores: with `--server-cores` / `--trainer-cores` (default: the last core for the server and
its threads, the others for the trainer; `taskset -a` on the server's process tree after it
started) each side gets its own; `--share-cores` leaves both on every core, as the experiment
scripts run. Other processes on the machine are not kept off them.

    MEGATRON_RMT_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/ahead.py [--steps 8]
    MEGATRON_RMT_VLLM_PYTHON=... python benchmarks/ahead.py --steps 6 --share-cores \
        --load runs/effect_smollm2/coldstart --hf runs/effect_smollm2/base_hf \
        --data-path runs/effect_smollm2/data/train_text_document --server-threads 2 \
        --kv-cache-bytes 1073741824 --config configs/smollm2_135m.yaml \
        configs/reproduce_cpu.yaml configs/effect_smollm2.yaml
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

from step_overhead import TOK, corpus  # noqa: E402

SHAPE = [
    "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--kv-channels", "32", "--num-layers", "2",
]  # fmt: skip
# The RL pass over shared prefixes (exact, tests/test_shared_prefix.py). The fused linear
# (--fused-linear-chunk-tokens 128) measured slower on this model's NTP pass (docs/rollout.md).
FAST = ["--rl-layout", "shared_prefix"]
RUNS = (
    ("ntp only", ["--rmt-variant", "ntp"]),
    ("on-policy", []),
    ("one ahead", ["--rollout-ahead", "1"]),
)
COLUMNS = (
    ("step_time", "step s"),
    ("ntp_pass_time", "NTP s"),
    ("rollout_latency", "wait s"),
    ("rl_time", "RL s"),
    ("sync_time", "sync s"),
)


def pin(pid: int, cores: str) -> None:
    """Every thread of `pid` and of its children onto `cores`."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for p in [str(pid), *children.stdout.split()]:
        subprocess.run(["taskset", "-a", "-p", "-c", cores, p], check=True, capture_output=True)


def core_count(cores: str) -> int:
    """Cores in a taskset list such as "0", "0,2" or "0-3,6"."""
    spans = [part.partition("-") for part in cores.split(",")]
    return sum(int(last or first) - int(first) + 1 for first, _, last in spans)


def train(
    model: list[str], url: str, extra: list[str], steps: int, cores: str, tmp: str, name: str,
    transfer: str,
):  # fmt: skip
    """One run of `steps` steps; its metrics after the first (warm-up) step."""
    metrics = os.path.join(tmp, name.replace(" ", "_") + ".jsonl")
    cmd = [
        "taskset", "-c", cores, sys.executable, os.path.abspath(__file__), *model,
        "--train-iters", str(steps), "--group-size", "4", "--rollout-url", url,
        "--weight-transfer", transfer, "--metrics-file", metrics, *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(core_count(cores)), PYTHONPATH=ROOT)
    # as the server (serve.CPU_ENV) and the experiment scripts: threads that wait sleep rather
    # than spin on cores the other side needs (docs/rollout.md, "Sharing the cores")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    with open(metrics) as fh:
        return [json.loads(line) for line in fh][1:]


def tiny_model(tmp: str) -> tuple[str, list[str]]:
    """The tiny random model: its HF folder for the server, and the trainer's flags."""
    from test_vllm import build_hf_model

    model_dir = os.path.join(tmp, "hf")
    build_hf_model(model_dir, 50257)
    flags = ["--train-rewarding-half", "--config", f"{ROOT}/configs/tiny_cpu.yaml", *TOK, *SHAPE]
    flags += ["--data-path", corpus(tmp), "--budget-initial", "16", "--max-response-tokens", "40"]
    return model_dir, flags + FAST


def checkpoint_model(args) -> tuple[str, list[str]]:
    """`--load`'s checkpoint, trained as it is with real rewards."""
    flags = ["--train", "--config", *args.config, "--load", args.load, "--no-load-optim"]
    flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", args.load]
    return args.hf, flags + ["--data-path", args.data_path]


def trainer(argv: list[str], rewarding_half: bool) -> None:
    """One training run, in this process; `rewarding_half`: every other sample rewarded."""
    from megatron_rmt import problems, train

    if rewarding_half:
        from test_vllm import _alternating_rewards

        problems.score = _alternating_rewards(problems.score)
    train.main(argv)


def main() -> None:
    if sys.argv[1:2] in (["--train"], ["--train-rewarding-half"]):
        trainer(sys.argv[2:], sys.argv[1] == "--train-rewarding-half")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    cores = sorted(os.sched_getaffinity(0))
    ap.add_argument("--server-cores", default=str(cores[-1]))
    ap.add_argument("--trainer-cores", default=",".join(map(str, cores[:-1] or cores)))
    ap.add_argument("--share-cores", action="store_true", help="server and trainer on every core")
    ap.add_argument("--server-threads", type=int, default=1, help="the CPU server's threads")
    ap.add_argument("--weight-transfer", choices=["gloo", "shm"], default="gloo")
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="the server's KV cache")
    ap.add_argument("--load", default=None, help="a checkpoint instead of the tiny random model")
    ap.add_argument("--hf", default=None, help="with --load: the model the server starts from")
    ap.add_argument("--data-path", default=None, help="with --load: the training shards")
    ap.add_argument("--config", nargs="+", default=[], help="with --load: the run's presets")
    args = ap.parse_args()
    if args.load and not (args.hf and args.data_path and args.config):
        ap.error("--load needs --hf, --data-path and --config")
    if args.share_cores:
        args.server_cores = args.trainer_cores = ",".join(map(str, cores))
    python = os.environ.get("MEGATRON_RMT_VLLM_PYTHON")
    if not python:
        sys.exit("set MEGATRON_RMT_VLLM_PYTHON to the vLLM venv's python")
    from megatron_rmt.rollout.serve import start_server

    cache = ("--kv-cache-memory-bytes", str(args.kv_cache_bytes)) if args.kv_cache_bytes else ()
    with tempfile.TemporaryDirectory() as tmp:
        served, model = checkpoint_model(args) if args.load else tiny_model(tmp)
        handle = start_server(
            served, python=python, weight_transfer="gloo", cpu_threads=args.server_threads,
            extra_args=cache,
        )  # fmt: skip
        try:
            pin(handle.process.pid, args.server_cores)
            rows = {
                name: train(
                    model,
                    handle.url,
                    extra,
                    args.steps,
                    args.trainer_cores,
                    tmp,
                    name,
                    args.weight_transfer,
                )
                for name, extra in RUNS
            }
        finally:
            handle.stop()
    print(f"{args.load or 'tiny random model'}: {args.steps} steps each, medians of steps "
          f"1..{args.steps - 1}; server on cores {args.server_cores} ({args.server_threads} "
          f"threads), trainer on {args.trainer_cores}, weights over "
          f"{args.weight_transfer}")  # fmt: skip
    print(f"{'run':<11}" + "".join(f"{title:>9}" for _, title in COLUMNS) + f"{'/ NTP':>8}")
    base = statistics.median(m["step_time"] for m in rows["ntp only"])
    for name, ms in rows.items():
        values = [statistics.median(m[key] for m in ms) for key, _ in COLUMNS]
        print(f"{name:<11}" + "".join(f"{v:>9.3f}" for v in values) + f"{values[0] / base:>8.2f}")


if __name__ == "__main__":
    main()
