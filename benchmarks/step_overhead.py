"""Cost of RMT over plain NTP on the tiny model, same tokens, one run, side by side.

Prints (1) time per step of NTP-only vs RMT (embedded rollouts), and (2) the cost of inline
entropy + bucketing + CAS inside the NTP pass vs a plain NTP pass over the same microbatches
(target: at most 5% extra), the two passes alternating round by round, with medians and the
min-max range of each (other processes share the cores: read the range as the noise). Run: python benchmarks/step_overhead.py [--steps N] [--data-path P]
[model flags, e.g. --hidden-size 512 --ffn-hidden-size 1408 --num-layers 8]: the tiny default model
is all vocabulary (hidden 64 vs 50k tokens), so the per-token vocabulary work dominates there.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = [
    "--tokenizer-type", "GPT2BPETokenizer",
    "--vocab-file", f"{ROOT}/corpus/gpt2_tokenizer/vocab.json",
    "--merge-file", f"{ROOT}/corpus/gpt2_tokenizer/merges.txt",
]  # fmt: skip


def corpus(tmp: str) -> str:
    prefix = os.path.join(tmp, "sample")
    subprocess.run(
        [sys.executable, f"{ROOT}/tools/preprocess_data.py", "--input",
         f"{ROOT}/corpus/sample_math.jsonl", "--output-prefix", prefix, "--append-eod", *TOK],
        check=True, capture_output=True,
    )  # fmt: skip
    return prefix + "_text_document"


def megatron_ce_pass(trainable, microbatches) -> None:
    """The plain NTP pass: GPTModel's own vocab-parallel cross-entropy, no entropy, no selection."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s]

        def loss_func(out):
            masked = (out * b["loss_mask"]).sum()
            return masked, b["loss_mask"].sum().to(torch.int), {}

        return loss, loss_func

    bsz, s = microbatches[0]["tokens"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches),
        model=trainable.model, num_microbatches=len(microbatches), seq_length=s,
        micro_batch_size=bsz, forward_only=False,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data-path")
    args, model_flags = ap.parse_known_args()  # e.g. --hidden-size 512 --num-layers 8
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from megatron_rmt import config, launch, parallel, selection, step, train

    torch.set_num_threads(1)
    data = args.data_path or corpus(tempfile.mkdtemp())
    base = ["--config", f"{ROOT}/configs/tiny_cpu.yaml", *TOK, "--data-path", data,
            "--train-iters", str(args.steps + 1), *model_flags]  # fmt: skip
    parallel.init()
    rows = {}
    for variant in ("ntp", "rmt"):
        run = launch.setup(config.parse([*base, "--rmt-variant", variant]))
        train.train_step(run, 0)  # warm-up
        times = [train.train_step(run, t)["step_time"] for t in range(1, args.steps + 1)]
        rows[variant] = statistics.median(times)

    # The NTP pass alone, with and without selection, over identical microbatches.
    run = launch.setup(config.parse([*base, "--rmt-variant", "rmt"]))
    mbs = [next(run.data) for _ in range(run.cfg.num_microbatches)]
    r = run.cfg.rmt
    sel = selection.Selector(
        mode="curriculum",
        probs=(0.5, 0.4, 0.1),
        k_per_unit=r.positions_per_sequence,
        thresholds=tuple(r.entropy_thresholds),
        eod_id=run.tokenizer.eod,
        min_context=r.min_context,
        seed=0,
        unit=r.position_unit,
    )
    passes = {
        "NTP, Megatron CE": lambda: megatron_ce_pass(run.trainable, mbs),
        "NTP + entropy + CAS": lambda: step.ntp_pass(
            run.trainable, mbs, sel, 0.1, r.entropy_chunk_tokens
        ),
    }
    # Interleaved rounds: load from other processes hits both passes alike; the paired
    # per-round ratio is steadier than a ratio of medians. Round 0 is a warm-up.
    samples = {name: [] for name in passes}
    for i in range(args.steps + 1):
        for name, fn in passes.items():
            run.trainable.zero_grads()
            t0 = time.perf_counter()
            fn()
            if i:
                samples[name].append(time.perf_counter() - t0)

    print(f"{'what':<28}{'median s':>10}{'ratio':>8}{'min-max s':>18}")
    print(f"{'step, NTP only':<28}{rows['ntp']:>10.3f}{1.0:>8.2f}")
    print(f"{'step, RMT (embedded)':<28}{rows['rmt']:>10.3f}{rows['rmt'] / rows['ntp']:>8.2f}")
    ref = samples["NTP, Megatron CE"]
    for name, ts in samples.items():
        ratios = [t / r for t, r in zip(ts, ref, strict=True)]
        spread = f"{min(ts):.4f}-{max(ts):.4f}"
        print(
            f"{name:<28}{statistics.median(ts):>10.4f}{statistics.median(ratios):>8.3f}{spread:>18}"
        )
    print("ratio: median over rounds of (pass time / Megatron CE pass time in the same round)")
    parallel.destroy()


if __name__ == "__main__":
    main()
