"""RL pass of one GRPO group: shared-prefix layout vs row-per-response, time and peak memory.

    python benchmarks/rl_pass.py [--prefixes 256 512 1024] [--group 8] [--response 16 64]
                                 [--layers N] [--repeats 2] [--threads 1]

The model has SmolLM2-135M's shape (configs/smollm2_135m.yaml) with random weights: the time of
a pass does not depend on the weights. `--layers` cuts the depth for a quicker run (every layer
costs the same, so the ratio barely moves; the vocabulary projection is a larger share).
One group per prefix length: a random prompt of that many tokens and G random responses whose
lengths are drawn uniformly from the `--response` range; the same group for both layouts.
Each (layout, prefix) runs in a fresh subprocess (same seed, so the same weights): one warm-up
pass, then `--repeats` timed passes (forward + backward through Megatron's schedule,
`step.rl_pass`), the median reported. Peak extra memory: on GPU `torch.cuda.max_memory_allocated`
above what the model and the group already hold; on CPU peak RSS (`ru_maxrss`) above the RSS
before the first pass. The loss (policy-loss sum) of both layouts is printed: it must agree.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def group(prefix: int, g: int, lengths: tuple[int, int], vocab: int):
    """One group (problems.Group): a request, its G responses (with rollout log-probs) and
    advantages, seeded by `prefix`."""
    import torch

    from megatron_rmt.problems import Group
    from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult

    gen = torch.Generator().manual_seed(prefix)
    prompt = torch.randint(0, vocab, (prefix,), generator=gen).tolist()
    sizes = torch.randint(lengths[0], lengths[1] + 1, (g,), generator=gen).tolist()
    responses = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in sizes]
    logps = [(-torch.rand(n, generator=gen)).tolist() for n in sizes]
    adv = torch.randn(1, g, generator=gen)
    request = RolloutRequest(prompt, g, lengths[1], 1.0, 1.0, 0)
    return Group(None, request, RolloutResult(responses, logps, 0), adv[0])


def measure(args) -> dict:
    """One layout at one prefix length, in this process."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import yaml

    from megatron_rmt import parallel, platform, rl_batch, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config, ModelConfig

    torch.set_num_threads(args.threads)
    with open(f"{ROOT}/configs/smollm2_135m.yaml") as fh:
        shape = yaml.safe_load(fh)["model"]
    if args.layers:
        shape["num_layers"] = args.layers
    shape["bf16"] = platform.cuda_available()
    model = ModelConfig(**shape, rl_layout="shared_prefix")  # honours masks; rows pass none
    parallel.init()
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=model), model.vocab_size)
    one = group(args.one_prefix, args.group, tuple(args.response), 49152)
    build = {"rows": rl_batch.rows_batches, "shared": rl_batch.shared_prefix_batches}
    mbs = build[args.one_layout]([one], 0)
    tokens = sum(int(len(r)) for r in one.result.responses)
    settings = step.RLSettings(1.0, "token", None, 16)
    cuda = platform.cuda_available()

    def one_pass():
        trainable.zero_grads()
        out = step.rl_pass(trainable, mbs, float(tokens), settings)
        if cuda:
            torch.cuda.synchronize()
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib() * 1024
    loss = one_pass().loss_sum
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    row_tokens = int(mbs[0].tokens.numel())
    return {"time": statistics.median(times), "peak": peak, "loss": loss, "tokens": row_tokens}


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--response", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--layers", type=int, default=0, help="0: SmolLM2's 30")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one-layout", help=argparse.SUPPRESS)
    ap.add_argument("--one-prefix", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_layout:
        print(json.dumps(measure(args)))
        return
    print(
        f"{'prefix':>6} {'layout':>7} {'tokens':>7} {'time s':>8} {'peak MiB':>9} "
        f"{'loss':>14} {'speed-up':>9} {'memory':>7}"
    )
    for prefix in args.prefixes:
        got = {}
        for layout in ("rows", "shared"):
            cmd = [sys.executable, __file__, "--one-layout", layout, "--one-prefix", str(prefix)]
            cmd += ["--group", str(args.group), "--response", *map(str, args.response)]
            cmd += ["--layers", str(args.layers), "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            got[layout] = json.loads(out.strip().splitlines()[-1])
        rows = got["rows"]
        for layout, r in got.items():
            speed = rows["time"] / r["time"]
            memory = r["peak"] / max(rows["peak"], 1)
            print(
                f"{prefix:>6} {layout:>7} {r['tokens']:>7} {r['time']:>8.3f} "
                f"{r['peak'] / 2**20:>9.1f} {r['loss']:>14.8f} {speed:>8.2f}x {memory:>7.2f}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
