"""On-policy vs one-step-ahead rollouts with a real vLLM server, same steps, same windows.

Starts one CPU vLLM server (tiny Qwen3: hidden 128, 4 heads of 32, 2 layers, GPT-2 vocabulary;
the weights pushed in memory over gloo after every step), then trains the same model three
times from the same seed on the same windows: NTP only (`--rmt-variant ntp`), RMT on-policy and
RMT one step ahead (`--rollout-ahead 1`). Prints per run the medians over the steps after the
first (warm-up) of the step time and its split: NTP pass, rollout wait after it, RL update,
weight sync; and each RMT run's step time over the NTP-only one. The randomly initialised model
never writes a parseable answer, so every reward would be 0 and the RL pass would skip every
group: as tests/test_vllm.py does, the trainer keeps the real scoring and then rewards every
other sample, so every group trains.

Cores: with `--server-cores` / `--trainer-cores` (default: the last core for the server and
its threads, the others for the trainer; `taskset -a` on the server's process tree after it
started) each side gets its own. Other processes on the machine are not kept off them.

    MEGATRON_RMT_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/ahead.py [--steps 8]
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


def train(data: str, url: str, extra: list[str], steps: int, cores: str, tmp: str, name: str):
    metrics = os.path.join(tmp, name.replace(" ", "_") + ".jsonl")
    cmd = [
        "taskset", "-c", cores, sys.executable, os.path.abspath(__file__), "--train",
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *TOK, *SHAPE, "--data-path", data,
        "--train-iters", str(steps), "--budget-initial", "16", "--max-response-tokens", "40",
        "--group-size", "4", "--rollout-url", url, "--weight-transfer", "gloo",
        "--metrics-file", metrics, *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    with open(metrics) as fh:
        return [json.loads(line) for line in fh][1:]  # the first step warms up


def trainer(argv: list[str]) -> None:
    """One training run, in this process, with every other sample rewarded (see above)."""
    from test_vllm import _alternating_rewards

    from megatron_rmt import problems, train

    problems.score = _alternating_rewards(problems.score)
    train.main(argv)


def main() -> None:
    if sys.argv[1:2] == ["--train"]:
        trainer(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    cores = sorted(os.sched_getaffinity(0))
    ap.add_argument("--server-cores", default=str(cores[-1]))
    ap.add_argument("--trainer-cores", default=",".join(map(str, cores[:-1] or cores)))
    args = ap.parse_args()
    python = os.environ.get("MEGATRON_RMT_VLLM_PYTHON")
    if not python:
        sys.exit("set MEGATRON_RMT_VLLM_PYTHON to the vLLM venv's python")
    from test_vllm import build_hf_model

    from megatron_rmt.rollout.serve import start_server

    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(tmp)
        model_dir = os.path.join(tmp, "hf")
        build_hf_model(model_dir, 50257)
        handle = start_server(model_dir, python=python, weight_transfer="gloo")
        try:
            pin(handle.process.pid, args.server_cores)
            rows = {
                name: train(data, handle.url, extra, args.steps, args.trainer_cores, tmp, name)
                for name, extra in RUNS
            }
        finally:
            handle.stop()
    print(f"{args.steps} steps each, medians of steps 1..{args.steps - 1}; server on cores "
          f"{args.server_cores}, trainer on {args.trainer_cores}")  # fmt: skip
    print(f"{'run':<11}" + "".join(f"{title:>9}" for _, title in COLUMNS) + f"{'/ NTP':>8}")
    base = statistics.median(m["step_time"] for m in rows["ntp only"])
    for name, ms in rows.items():
        values = [statistics.median(m[key] for m in ms) for key, _ in COLUMNS]
        print(f"{name:<11}" + "".join(f"{v:>9.3f}" for v in values) + f"{values[0] / base:>8.2f}")


if __name__ == "__main__":
    main()
