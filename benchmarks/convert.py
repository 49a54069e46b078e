"""Time and peak resident memory of checkpoint conversion on SmolLM2-135M, and the peak it predicts
for a 14B model.

    python benchmarks/convert.py [--gguf PATH]

Three conversions run one after another, each in a fresh single-process child (TP1 PP1): GGUF ->
Megatron, Megatron -> HF safetensors, and HF safetensors -> Megatron. Each child reports its wall
time, its anonymous resident memory once everything is imported and the process group is up (the
baseline) and at its peak (sampled every 5 ms), and ru_maxrss, which also counts the pages of the
memory-mapped source file (page cache the kernel can drop, not a copy of the model). If the conversion streams, peak - baseline is about the model in fp32
plus one tensor; a converter that held two copies would show twice the model.

The 14B prediction uses Qwen3-14B's shapes (40 layers, hidden 5120, FFN 17408, 40/8 heads of 128,
vocab 151936, untied) and bounds the measured excess over the model two ways (see the output).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(
    ROOT, "..", "shared", "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf"
)
GIB = 1 << 30


def _anon_bytes() -> int:
    """Resident anonymous memory: RSS without memory-mapped file pages (safetensors, GGUF)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _sample_anon_peak(peak: list, stop: threading.Event) -> None:
    while not stop.wait(0.005):
        peak[0] = max(peak[0], _anon_bytes())


def child(phase: str, src: str, dst: str) -> None:
    """One conversion in this process; prints a JSON line of measurements."""

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_hf_to_megatron as to_megatron
    import convert_megatron_to_hf as to_hf

    from megatron_rmt import parallel

    parallel.init()
    baseline, anon_peak, stop = _anon_bytes(), [0], threading.Event()
    sampler = threading.Thread(target=_sample_anon_peak, args=(anon_peak, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    if phase == "to_hf":
        to_hf.export(src, dst)
    else:
        source = to_megatron.open_source(src)
        to_megatron.convert(source, dst, to_megatron.prepare(source, dst, 1, 1, 1))
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"seconds": seconds, "baseline": baseline, "peak": anon_peak[0], "rss_peak": rss_peak}
    print(json.dumps(out))
    parallel.destroy()


def run(phase: str, src: str, dst: str) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, src, dst]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def qwen3_14b_bytes() -> tuple[int, int]:
    """(parameters x 4 bytes, largest tensor x 4 bytes) of Qwen3-14B in fp32."""
    h, ffn, layers, vocab, d = 5120, 17408, 40, 151936, 128
    per_layer = h * (40 * d) * 2 + h * (8 * d) * 2 + 3 * h * ffn + 2 * h + 2 * d
    params = layers * per_layer + 2 * vocab * h + h
    return 4 * params, 4 * vocab * h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=os.path.normpath(DEFAULT_GGUF))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    if not os.path.isfile(args.gguf):
        sys.exit(f"{args.gguf}: SmolLM2 GGUF not found (pass --gguf)")
    work = tempfile.mkdtemp(prefix="convert-bench-")
    try:
        ckpt, hf, ckpt2 = (os.path.join(work, n) for n in ("ckpt", "hf", "ckpt2"))
        rows = [
            ("GGUF -> Megatron", run("to_megatron", args.gguf, ckpt)),
            ("Megatron -> HF", run("to_hf", ckpt, hf)),
            ("HF -> Megatron", run("to_megatron", hf, ckpt2)),
        ]
        model = sum(
            os.path.getsize(os.path.join(hf, f))
            for f in os.listdir(hf)
            if f.endswith(".safetensors")
        )
        largest = 49152 * 576 * 4  # the (tied) embedding
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"SmolLM2-135M, fp32 model {model / GIB:.3f} GiB, largest tensor {largest / GIB:.3f} GiB")
    print(
        f"{'conversion':<18}{'seconds':>9}{'base GiB':>10}{'peak GiB':>10}{'peak-base':>11}"
        f"{'(peak-base)/model':>19}{'RSS peak incl. mmap':>21}"
    )
    for name, r in rows:
        extra = r["peak"] - r["baseline"]
        print(
            f"{name:<18}{r['seconds']:>9.1f}{r['baseline'] / GIB:>10.3f}{r['peak'] / GIB:>10.3f}"
            f"{extra / GIB:>11.3f}{extra / model:>19.2f}{r['rss_peak'] / GIB:>21.3f}"
        )
    # The excess over the model is part constant (imports, GGUF metadata), part per-tensor
    # transients (random init of the embedding, dequantisation): bound the 14B peak both ways.
    excess = max(r["peak"] - r["baseline"] for _, r in rows) - model
    base = max(r["baseline"] for _, r in rows)
    big, big_largest = qwen3_14b_bytes()
    low = big + big_largest + base + max(excess - largest, 0)
    high = big + base + excess / largest * big_largest
    print(
        f"predicted Qwen3-14B peak, fp32, one process: {low / GIB:.1f} GiB (excess constant) to "
        f"{high / GIB:.1f} GiB (excess scales with the largest tensor); model alone "
        f"{big / GIB:.1f} GiB. bf16 parameters (--bf16) halve the model term; TP x PP = N ranks "
        f"split it N ways (each rank adds its own baseline)."
    )


if __name__ == "__main__":
    main()
