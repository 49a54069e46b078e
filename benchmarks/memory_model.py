"""The memory model (megatron_rmt/memory.py) against measured CPU peaks, and its table for the
paper's 14B setting.

    python benchmarks/memory_model.py            # check on CPU (tiny, SmolLM2 shapes) + 14B table
    python benchmarks/memory_model.py --table    # the 14B table only (no measurement)

Measurement: each case runs in a fresh process (one rank, gloo, fp32, random weights of the
model's shapes). After `parallel.init` the process's resident set (RSS) is read as the baseline;
the model, DDP buffers and optimizer are built and one full step (NTP pass over the windows, RL
pass over synthetic groups, optimizer step) is run, so Adam's state exists; then the kernel's
peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs` resets VmHWM) and a second step runs.
Measured peak = VmHWM after the second step - baseline: the steady-state peak of a step, as the
model predicts it. The processes run with glibc's mmap threshold fixed at 64 KiB
(`MALLOC_MMAP_THRESHOLD_`), so every tensor of 64 KiB or more is its own mapping, unmapped when
freed, and RSS follows live tensor memory (with the default dynamic threshold, freed activations
stay in the heap and RSS shows the allocator's cache). Small allocations, Python objects and
page granularity are the error the comparison carries.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1024**3
MIB = 1024**2
# A fixed mmap threshold: glibc then serves every block of 64 KiB or more with mmap and unmaps it
# when freed (by default the threshold grows after the first large free, and freed activations
# stay resident in the heap, so RSS would count the allocator's cache, not live tensors).
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}

# (name, config file, overrides of the model section, NTP micro batch, RL rows, RL length)
CASES = [
    ("tiny", "configs/tiny_cpu.yaml", {}, 2, 4, 168),
    ("tiny, long RL rows", "configs/tiny_cpu.yaml", {}, 2, 8, 1024),
    ("SmolLM2-135M", "configs/smollm2_135m.yaml", {}, 2, 4, 672),
    ("SmolLM2-135M, full recompute", "configs/smollm2_135m.yaml",
     {"recompute_granularity": "full", "recompute_method": "uniform",
      "recompute_num_layers": 1}, 2, 4, 672),
]  # fmt: skip


def _model_config(path: str, overrides: dict, world_size: int = 1):
    from megatron_rmt import config

    cfg = config.parse(["--config", os.path.join(ROOT, path)], world_size=world_size)
    return dataclasses.replace(cfg.model, **overrides)


def _vocab(m) -> int:
    return m.vocab_size or 50304  # the tiny config's GPT-2 vocabulary, padded to 128


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case_index: int) -> dict:
    """Run in a fresh process: the steady-state peak of one step, measured and predicted."""
    import torch

    from megatron_rmt import memory, parallel, selection, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config, DataConfig, OptimConfig
    from megatron_rmt.rl_batch import RowsBatch

    name, path, overrides, micro, rows, length = CASES[case_index]
    torch.set_num_threads(1)
    m = _model_config(path, overrides)
    parallel.init(1, 1)
    cfg = Config(model=m, data=DataConfig(micro_batch_size=micro, global_batch_size=micro),
                 optim=OptimConfig(lr=1e-6))  # fmt: skip
    vocab = _vocab(m)
    baseline = _rss("VmRSS")
    trainable = build_trainable(cfg, vocab)
    selector = selection.Selector(None, (1.0, 0.0, 0.0), 1, (0.5, 1.0, 1.5), 0, 1, 0)
    g = torch.Generator().manual_seed(0)
    for t in range(2):
        if t == 1:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        window = torch.randint(0, vocab, (micro, m.seq_length + 1), generator=g)
        ntp = {
            "tokens": window[:, :-1],
            "labels": window[:, 1:],
            "loss_mask": torch.ones(micro, m.seq_length),
            "position_ids": torch.arange(m.seq_length).expand(micro, -1),
            "context_len": torch.arange(1, m.seq_length + 1).expand(micro, -1),
            "sample_ids": torch.arange(micro),
        }
        rl_tokens = torch.randint(0, vocab, (rows, length + 1), generator=g)
        group = RowsBatch(
            tokens=rl_tokens[:, :-1],
            labels=rl_tokens[:, 1:],
            resp_mask=torch.ones(rows, length),
            old_logp=torch.zeros(rows, length),
            advantages=torch.randn(rows, generator=g),
        )
        trainable.zero_grads()
        step.ntp_pass(trainable, [ntp], selector, 0.1, 16)
        step.rl_pass(
            trainable, [group], float(rows * length), step.RLSettings(1.0, "token", None, 16)
        )
        trainable.optimizer_step()
    measured = _rss("VmHWM") - baseline
    params = memory.count_params(trainable.model[0].module)
    work = memory.Workload(micro * m.seq_length, rows, length)
    est = memory.predict(m, memory.Layout(), params, work, gpu=False, vocab=vocab, ce_chunk=16)
    parallel.destroy()
    return {"name": name, "measured": measured, "predicted": est.peak,
            "rows": memory.table(est)}  # fmt: skip


def check_on_cpu() -> list[dict]:
    out = []
    for i in range(len(CASES)):
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", str(i)],
            capture_output=True, text=True, env={**os.environ, **MEASURE_ENV},
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"case {CASES[i][0]} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'case':32s} {'measured MiB':>13s} {'predicted MiB':>14s} {'error':>7s}")
    for r in out:
        err = (r["predicted"] - r["measured"]) / r["measured"]
        print(f"{r['name']:32s} {r['measured'] / MIB:13.1f} {r['predicted'] / MIB:14.1f} "
              f"{err:+7.1%}")  # fmt: skip
    return out


def paper_table() -> None:
    """The 14B paper setting: TP 8, DP 2, bf16, TE (flash attention; TE's unfused attention for
    the shared-prefix mask), batch 128 x 4096, G 8."""
    from megatron_rmt import memory
    from megatron_rmt.dryrun import meta_params

    m = _model_config("configs/qwen3_14b.yaml", {}, world_size=16)
    plain = dataclasses.replace(m, recompute_granularity=None, recompute_method=None,
                           recompute_num_layers=None, sequence_parallel=False)  # fmt: skip
    params = meta_params(plain, m.vocab_size)
    layout = memory.Layout(tp=8, pp=1, dp=2)
    full = {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": 1}  # fmt: skip
    settings = [
        ("no recompute, no SP", plain, 8),
        ("SP", dataclasses.replace(plain, sequence_parallel=True), 8),
        ("selective recompute + SP", dataclasses.replace(
            plain, sequence_parallel=True, recompute_granularity="selective"), 8),
        ("full recompute", dataclasses.replace(plain, **full), 8),
        ("full recompute + SP (configs/qwen3_14b.yaml)",
         dataclasses.replace(plain, sequence_parallel=True, **full), 8),
        ("no recompute, SP, 1-row RL microbatches",
         dataclasses.replace(plain, sequence_parallel=True), 1),
        ("shared prefix, no recompute, no SP", plain, None),
        ("shared prefix, full recompute, no SP", dataclasses.replace(plain, **full), None),
    ]  # fmt: skip
    responses = [1700, 2048]
    print("\nQwen3-14B, TP 8 x DP 2, bf16, distributed optimizer; GiB per GPU")
    header = f"{'setting':44s} {'RL len':>6s} {'static':>7s} {'NTP act':>8s} {'RL act':>7s} "
    print(header + f"{'RL logits':>9s} {'peak':>6s}")
    for name, mc, rows in settings:
        for response in responses:
            if rows is None:  # one row: the prompt, then the G responses
                work = memory.shared_prefix_workload(4096, 8, 4096, response)
            else:
                work = memory.Workload(4096, rows, 4096 + response)
            e = memory.predict(mc, layout, params, work, gpu=True)
            print(f"{name:44s} {work.rl_length:6d} {e.static / GIB:7.1f} "
                  f"{e.ntp_activations / GIB:8.1f} {e.rl_activations / GIB:7.1f} "
                  f"{e.rl_logits / GIB:9.1f} {e.peak / GIB:6.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="the 14B table only")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    if not args.table:
        check_on_cpu()
    paper_table()


if __name__ == "__main__":
    main()
