"""A cost model of one RMT step of Qwen3-14B at the paper's settings on 16 H100s.

    python benchmarks/step_model.py [--layers 4] [--no-measure]
        [--prefix 2000] [--response 400] [--mfu 0.40] [--rollout-tokens-per-s 2500] ...

Two parts, both printed:
1. Measured here (CPU, this machine; other processes share it): per-token costs of the NTP pass
   and of the shared-prefix RL pass (per prompt token and per response token, from the slopes of
   two group shapes each) on the tiny model and on SmolLM2-135M's shape (random weights,
   `--layers` of its 30), the weight-sync write rate (safetensors to local disk), and each
   cost's ratio to the NTP token next to the ratio the FLOP count below predicts for that model.
   Where they agree, FLOPs are a fair guide to how the passes compare.
2. Predicted: the step's split (NTP, rollouts, RL, weight sync) for Qwen3-14B on 16 H100s, from
   FLOPs at an assumed model-FLOP utilisation, rows layout vs shared prefixes, serial vs rollouts
   overlapped with the NTP pass. Every assumption is printed with the table.

FLOPs per token (fwd + bwd = 3 x fwd; fwd = 2 x multiply-adds): the dense matmuls
2 x (non-embedding params), the output layer 2 h v where logits are computed, attention
4 L h_attn x (keys attended to). Rollouts: decode at an assumed aggregate rate, bounded below by
the longest response at an assumed per-sequence rate (the vLLM server is not measured here:
its CPU rate would not transfer to an H100; see docs/step_model.md).
"""

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BF16 = 989e12  # dense bf16 FLOP/s of one H100 SXM


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int

    def dense_params(self) -> int:  # per layer: QKV, output projection, SwiGLU
        attn = self.hidden * self.head_dim * (self.heads + 2 * self.groups)
        attn += self.heads * self.head_dim * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.ffn)

    def train_flops(self, tokens: float, keys: float, logits: float) -> float:
        """fwd + bwd FLOPs of `tokens` tokens attending to `keys` keys each on average, with
        `logits` positions projected onto the vocabulary."""
        matmul = 2 * self.dense_params() * tokens
        attention = 4 * self.layers * self.heads * self.head_dim * keys * tokens
        output = 2 * self.hidden * self.vocab * logits
        return 3 * (matmul + attention + output)


QWEN3_14B = Shape(40, 5120, 17408, 40, 8, 128, 151936)


def ntp_flops(m: Shape, tokens: float, seq: int) -> float:
    return m.train_flops(tokens, seq / 2, tokens)


def rl_flops(m: Shape, groups: int, g: int, prefix: float, resp: float, shared: bool) -> float:
    """RL pass FLOPs. Rows: G rows of prefix + response, logits everywhere (rows layout). Shared:
    the prefix once, the G responses attend to it, logits at response tokens only."""
    if shared:
        tokens = prefix + g * resp
        keys = (prefix * prefix / 2 + g * resp * (prefix + resp / 2)) / tokens
        return groups * m.train_flops(tokens, keys, g * resp)
    tokens = prefix + resp
    return groups * g * m.train_flops(tokens, tokens / 2, tokens)


def _shape_of(cfg) -> Shape:
    return Shape(
        cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
        cfg.num_query_groups, cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        cfg.vocab_size,
    )  # fmt: skip


def measure_model(name: str, model_cfg, seq: int, repeats: int) -> dict:
    """Per-token seconds of the NTP pass and the shared-prefix RL pass on this machine."""
    import torch
    from rl_pass import group

    from megatron_rmt import rl_batch, selection, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config

    torch.manual_seed(0)
    trainable = build_trainable(Config(model=model_cfg), model_cfg.vocab_size)
    v = model_cfg.vocab_size

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            trainable.zero_grads()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    tokens = torch.randint(0, v, (1, seq + 1))
    ntp_mb = [{
        "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq),
        "position_ids": torch.arange(seq)[None], "context_len": torch.arange(1, seq + 1)[None],
        "sample_ids": torch.tensor([0]),
    }]  # fmt: skip
    sel = selection.Selector(None, (1.0, 0.0, 0.0), 1, None, 0, 1, 0)
    t_ntp = timed(lambda: step.ntp_pass(trainable, ntp_mb, sel, 1.0, 1024)) / seq

    def rl_time(prefix: int, resp: int) -> float:
        mbs = rl_batch.shared_prefix_batches([group(prefix, 8, (resp, resp), v)], 0)
        settings = step.RLSettings(1.0, "token", None, 1024)
        return timed(lambda: step.rl_pass(trainable, mbs, 8.0 * resp, settings))

    p1, p2, r1, r2 = seq // 4, seq, seq // 32, seq // 8
    per_prefix = (rl_time(p2, r1) - rl_time(p1, r1)) / (p2 - p1)
    per_resp = (rl_time(p1, r2) - rl_time(p1, r1)) / (8 * (r2 - r1))
    m = _shape_of(model_cfg)
    f_ntp = ntp_flops(m, seq, seq) / seq
    # FLOP slopes of the same two shapes (the mean context of each group's tokens differs).
    f_prefix = (rl_flops(m, 1, 8, p2, r1, True) - rl_flops(m, 1, 8, p1, r1, True)) / (p2 - p1)
    f_resp = (rl_flops(m, 1, 8, p1, r2, True) - rl_flops(m, 1, 8, p1, r1, True)) / (8 * (r2 - r1))
    return {
        "name": name, "ntp": t_ntp, "prefix": per_prefix, "resp": per_resp,
        "flop_ratio_prefix": f_prefix / f_ntp, "flop_ratio_resp": f_resp / f_ntp,
    }  # fmt: skip


def measure_sync(mib: int = 256) -> float:
    """GB/s of writing bf16 weights as safetensors to local disk (the weight-sync directory)."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"w{i}": torch.randn(mib // 8, 2**19).bfloat16() for i in range(4)}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_file(tensors, os.path.join(d, "w.safetensors"))
        os.sync()
        seconds = time.perf_counter() - t0
    return sum(t.numel() * 2 for t in tensors.values()) / seconds / 1e9


def measured_part(args) -> list[dict]:
    import torch
    import yaml

    from megatron_rmt import parallel, rl_batch, step  # noqa: F401 (imported before init)
    from megatron_rmt.build import build_trainable  # noqa: F401
    from megatron_rmt.config import ModelConfig

    torch.set_num_threads(1)
    parallel.init()
    with open(f"{ROOT}/configs/smollm2_135m.yaml") as fh:
        smol = yaml.safe_load(fh)["model"] | {"num_layers": args.layers}
    with open(f"{ROOT}/configs/tiny_cpu.yaml") as fh:
        tiny = yaml.safe_load(fh)["model"] | {"vocab_size": 50304}
    rows = []
    for name, shape, seq in (("tiny", tiny, 256), (f"SmolLM2 {args.layers}L", smol, 512)):
        cfg = ModelConfig(**shape, rl_layout="shared_prefix")
        rows.append(measure_model(name, cfg, seq, args.repeats))
    print("Measured here (CPU, 1 thread, machine shared with other jobs: times are inflated)")
    print(f"{'model':<14}{'NTP s/tok':>11}{'RL prefix/NTP':>15}{'(FLOPs)':>9}"
          f"{'RL resp/NTP':>13}{'(FLOPs)':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['name']:<14}{r['ntp']:>11.2e}{r['prefix'] / r['ntp']:>15.2f}"
            f"{r['flop_ratio_prefix']:>9.2f}{r['resp'] / r['ntp']:>13.2f}{r['flop_ratio_resp']:>9.2f}"
        )
    print(f"weight-sync write (safetensors, local disk): {measure_sync():.2f} GB/s")
    return rows


def predicted_part(args) -> None:
    m, gpus = QWEN3_14B, args.gpus
    rate = gpus * H100_BF16 * args.mfu
    ntp_tokens = args.windows * args.seq
    ntp = ntp_flops(m, ntp_tokens, args.seq) / rate
    rl_rows = rl_flops(m, args.windows, args.group, args.prefix, args.response, False) / rate
    rl_shared = rl_flops(m, args.windows, args.group, args.prefix, args.response, True) / rate
    decode_tokens = args.windows * args.group * args.response
    rollout = max(
        decode_tokens / (gpus * args.rollout_tokens_per_s),
        args.response_max / args.sequence_tokens_per_s,
    )
    weight_bytes = 2 * (m.dense_params() + 2 * m.vocab * m.hidden)
    sync = weight_bytes / (args.sync_gb_per_s * 1e9)
    print()
    print(f"Predicted: Qwen3-14B ({weight_bytes / 2e9:.1f} B parameters), {gpus} x H100")
    print(f"{'layout':<16}{'NTP s':>8}{'rollout s':>11}{'RL s':>8}{'sync s':>8}"
          f"{'serial s':>10}{'overlapped s':>14}{'ahead s':>9}{'floor s':>9}")  # fmt: skip
    for name, rl in (("rows", rl_rows), ("shared prefix", rl_shared)):
        serial = ntp + rollout + rl + sync
        overlapped = max(ntp, rollout) + rl + sync
        # One step ahead: step t's rollouts run through its NTP and RL passes; the weight sync
        # drains them (vLLM's pause waits for requests in flight) before it pushes the weights.
        ahead = max(ntp + rl, rollout) + sync
        floor = max(rollout, ntp + rl + sync)  # a sync that did not wait for them
        print(
            f"{name:<16}{ntp:>8.1f}{rollout:>11.1f}{rl:>8.1f}{sync:>8.1f}"
            f"{serial:>10.1f}{overlapped:>14.1f}{ahead:>9.1f}{floor:>9.1f}"
        )
    print("Assumptions:")
    for line in (
        f"batch {args.windows} windows x {args.seq} tokens, one RL position per window, "
        f"G = {args.group}",
        f"mean prefix {args.prefix} tokens, mean response {args.response} tokens "
        f"(B_t decays 800 -> 160), longest response {args.response_max}",
        f"training at {args.mfu:.0%} MFU of {H100_BF16 / 1e12:.0f} TFLOP/s bf16 per GPU for "
        "every pass (FLOPs above; no recompute, no pipeline bubble)",
        "RL rows layout computes logits at every position (as today); shared prefix only at "
        "response tokens; no KL reference forward (beta = 0)",
        f"rollouts (no vLLM measurement): {args.rollout_tokens_per_s:.0f} decoded tokens/s per "
        f"GPU on all {gpus} GPUs, >= {args.sequence_tokens_per_s:.0f} tokens/s per sequence; "
        "prompt prefill ignored (prefix caching shares it over G)",
        f"weight sync of bf16 weights at {args.sync_gb_per_s:.0f} GB/s (NCCL broadcast; the "
        "directory-based sync measured above is far slower)",
        "overlapped: rollouts run while the NTP pass does (problems are submitted per "
        "microbatch), on other GPUs or interleaved at no cost to either",
        "ahead (--rollout-ahead 1): step t's rollouts also run through its RL pass and are "
        "trained in step t+1; the sync's /pause?mode=wait lets them finish first, so a step is "
        "max(NTP + RL, rollouts) + sync; floor: max(rollouts, NTP + RL + sync), a sync that "
        "would not wait (in-flight weight update, partial rollouts)",
    ):
        print(f"  - {line}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="SmolLM2 layers to measure (of 30)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-measure", action="store_true", help="print the prediction only")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prefix", type=float, default=2000)
    ap.add_argument("--response", type=float, default=400)
    ap.add_argument("--response-max", type=float, default=1616)
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--rollout-tokens-per-s", type=float, default=2500)
    ap.add_argument("--sequence-tokens-per-s", type=float, default=40)
    ap.add_argument("--sync-gb-per-s", type=float, default=20)
    args = ap.parse_args()
    if not args.no_measure:
        measured_part(args)
    predicted_part(args)


if __name__ == "__main__":
    main()
