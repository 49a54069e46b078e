"""Fused chunked CE + entropy vs the naive full-vocabulary fp32 softmax: time and peak memory.

    python benchmarks/entropy.py [--tokens 4096] [--vocab 151936] [--dtype bf16] [--chunk 1024]
    python benchmarks/entropy.py --hidden 5120 [--chunk 256 128] ...

With `--hidden H` the output projection is part of the work: the current path (hidden @ W^T,
then the fused CE + entropy in place, as the NTP pass runs it) against the fused linear + CE +
entropy (fused_linear.py, `--chunk` tokens at a time, logits never all live). Inputs are the
hidden states `[tokens, H]` and the weight `[vocab, H]`; both variants return their gradients,
counted in the peak and left out of the workspace.

Both variants do the same work: per-token CE of the label (with gradient) and entropy (detached),
then backward with a ones gradient. Each runs in a fresh subprocess so one's allocations cannot
hide the other's. Peak extra memory is measured above the inputs (logits, labels) and includes
the gradient of the logits, which both variants must return (the in-place variant writes it
over the logits, so it costs nothing extra there): on GPU from
`torch.cuda.max_memory_allocated`, on CPU as peak RSS (`ru_maxrss`) minus the RSS after the
inputs exist (PyTorch's CPU allocator returns large blocks to the OS, so RSS tracks live tensors).
The table also gives the workspace: peak extra minus a separately allocated gradient.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def naive_step(logits, labels):
    """The usual way: upcast everything to fp32, full log-softmax, entropy from it."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, v] fp32
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    loss.backward(torch.ones_like(loss))
    return entropy


def fused_step(logits, labels, chunk, inplace):
    from megatron_rmt.entropy import vocab_parallel_ce_entropy

    loss, entropy = vocab_parallel_ce_entropy(
        logits, labels, chunk_tokens=chunk, inplace_backward=inplace
    )
    loss.backward(torch.ones_like(loss))
    return entropy


def linear_step(hidden, weight, labels, chunk, fused):
    """The output projection + CE + entropy: logits then the in-place kernel, or fused."""
    from megatron_rmt.entropy import vocab_parallel_ce_entropy
    from megatron_rmt.fused_linear import linear_ce_entropy

    if fused:  # the NTP pass's use: the gradient expected is the loss mask (all ones here)
        ones = torch.ones(labels.shape, device=labels.device)
        loss, entropy = linear_ce_entropy(
            hidden, weight, labels, chunk_tokens=chunk, expected_grad=ones
        )
    else:
        logits = hidden @ weight.t()  # [N, v], as the output layer computes it
        loss, entropy = vocab_parallel_ce_entropy(
            logits, labels, chunk_tokens=chunk, inplace_backward=True
        )
    loss.backward(torch.ones_like(loss))
    return entropy


def measure(args) -> dict:
    """One variant in this process: warm-up, then `--repeats` timed forward+backward passes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    dtype = DTYPES[args.dtype]
    if args.hidden:
        hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
        weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) / 30
        logits = hidden.requires_grad_()  # the input whose gradient is reset between passes
        weight.requires_grad_()
    else:
        logits = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype)
        logits.requires_grad_()
    if args.hidden:
        fused = args.variant == "fused-linear"
        step = lambda: linear_step(logits, weight, labels, args.chunk, fused)  # noqa: E731
    elif args.variant == "naive":
        step = lambda: naive_step(logits, labels)  # noqa: E731
    else:
        inplace = args.variant == "fused-inplace"
        step = lambda: fused_step(logits, labels, args.chunk, inplace)  # noqa: E731

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil  # CPU only: the GPU machines need not have it

        base = psutil.Process().memory_info().rss
    step()
    logits.grad = None
    if args.hidden:
        weight.grad = None
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        logits.grad = None
        if args.hidden:
            weight.grad = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    inplace = args.variant == "fused-inplace"
    grad_extra = 0 if inplace else logits.numel() * logits.element_size()
    if args.hidden:  # both return the gradients of the hidden states and of the weight
        grad_extra += weight.numel() * weight.element_size()
    return {"device": str(device), "seconds": min(times), "peak": peak, "grad_extra": grad_extra}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--chunk", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=0, help="H > 0: with the projection")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.variant:
        args.chunk = args.chunk[0]
        print(json.dumps(measure(args)))
        return

    runs = [("naive fp32", "naive", args.chunk[0])]
    for c in args.chunk:
        runs += [(f"fused c={c}", "fused", c), (f"fused c={c} inpl", "fused-inplace", c)]
    if args.hidden:  # the reference is the current path: logits, then the in-place kernel
        runs = [("linear + fused", "linear", args.chunk[0])]
        runs += [(f"fused-linear c={c}", "fused-linear", c) for c in args.chunk]
    results = []
    for name, variant, chunk in runs:
        cmd = [sys.executable, __file__, "--variant", variant, "--chunk", str(chunk)]
        cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab)]
        cmd += ["--dtype", args.dtype, "--repeats", str(args.repeats)]
        cmd += ["--hidden", str(args.hidden)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append((name, json.loads(out.strip().splitlines()[-1])))

    naive = results[0][1]
    gib = 2.0**30
    what = f"hidden {args.hidden}, " if args.hidden else ""
    print(f"{args.tokens} tokens x vocab {args.vocab}, {what}{args.dtype}, {naive['device']}")
    print(
        f"{'variant':<18}{'fwd+bwd s':>10}{'peak extra GiB':>16}{'workspace GiB':>15}"
        f"{'time ratio':>12}{'peak ratio':>12}"
    )
    for name, r in results:
        print(
            f"{name:<18}{r['seconds']:>10.3f}{r['peak'] / gib:>16.3f}"
            f"{(r['peak'] - r['grad_extra']) / gib:>15.3f}{r['seconds'] / naive['seconds']:>12.3f}"
            f"{r['peak'] / naive['peak']:>12.3f}"
        )
    if args.hidden:
        print("ratios are fused-linear / current path: workspace target <= 0.125, time <= 1.1")
    else:
        print("ratios are fused / naive: peak target <= 0.125, time target <= 1.0")


if __name__ == "__main__":
    main()
