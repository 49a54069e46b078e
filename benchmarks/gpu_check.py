"""The Python parts of benchmarks/gpu_check.sh; each prints `RESULT <name> | <value> | <target>`
lines that the script gathers into its table (docs/gpu.md says what each row means).

    python benchmarks/gpu_check.py precision     # local spec (no TE) in bf16 vs fp32, same weights
    python benchmarks/gpu_check.py te-vs-local   # TE layer spec vs local spec: same logits
    python benchmarks/gpu_check.py kernel-accuracy  # fused CE+entropy, fused linear: bf16 vs fp32
    python benchmarks/gpu_check.py kernels FLAGS # benchmarks/entropy.py FLAGS, as RESULT lines
    python benchmarks/gpu_check.py shared-prefix # shared-prefix layout vs rows: same log-probs
    python benchmarks/gpu_check.py mfu           # NTP-pass MFU of a 1.6B Qwen3-shaped model
    python benchmarks/gpu_check.py transfer      # weight-transfer GB/s between two processes
    python benchmarks/gpu_check.py rmt OUT       # pre-train, cold start, RMT, held-out NTR

`--small` (after the part's name) runs a part at toy sizes on whatever device there is: the CPU
rehearsal of the code paths (docs/gpu.md); its numbers say nothing about a GPU.
"""

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}
ONE_B = dict(
    model_family="qwen3", num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
    num_attention_heads=16, num_query_groups=8, kv_channels=128, vocab_size=151936,
    seq_length=4096, bf16=True,
)  # fmt: skip


SMALL = False  # --small: toy sizes, any device (the CPU rehearsal)


def result(name: str, value: str, target: str) -> None:
    print(f"RESULT {name} | {value} | {target}", flush=True)


def _device() -> torch.device:
    from megatron_rmt import platform

    return platform.device()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def precision() -> None:
    """The local layer spec (no Transformer Engine) in bf16 against the same weights in fp32:
    logits and per-token loss of one batch, forward only."""
    import torch.nn.functional as F

    from megatron_rmt import parallel
    from megatron_rmt.config import ModelConfig
    from megatron_rmt.model.builder import build_model
    from megatron_rmt.model.logits import forward_logits

    parallel.init()
    if SMALL:
        shape, vocab, batch, seq = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176,
            num_attention_heads=4, num_query_groups=2, kv_channels=16), 512, 2, 32  # fmt: skip
    else:
        shape, vocab, batch, seq = dict(num_layers=8, hidden_size=1024, ffn_hidden_size=2816,
            num_attention_heads=8, num_query_groups=4, kv_channels=128), 32000, 4, 1024  # fmt: skip
    models = {}
    for bf16 in (False, True):
        cfg = ModelConfig(**shape, seq_length=seq, transformer_impl="local", bf16=bf16)
        torch.manual_seed(0)
        models[bf16] = build_model(cfg, vocab).eval()
    with torch.no_grad():
        for (name, p), (name16, q) in zip(
            models[False].named_parameters(), models[True].named_parameters(), strict=True
        ):
            assert name == name16, (name, name16)
            q.copy_(p)  # the bf16 model holds the fp32 weights, rounded
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=dev, generator=g)
    positions = torch.arange(seq, device=dev).expand(batch, seq)
    out = {}
    with torch.no_grad():
        for bf16, model in models.items():
            logits = forward_logits(model, tokens[:, :-1], positions).float()  # [b, s, v]
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            out[bf16] = logits, loss
    (l32, ce32), (l16, ce16) = out[False], out[True]
    what = f"{shape['num_layers']} layers, h {shape['hidden_size']}, {batch}x{seq} tokens"
    result(
        f"local spec bf16 vs fp32 ({what})",
        f"logits max rel diff {_rel(l16, l32):.1e}; per-token CE mean |diff| "
        f"{float((ce16 - ce32).abs().mean()):.1e} nats (mean CE {float(ce32.mean()):.3f})",
        "rel < 5e-2, CE diff < 1e-2",
    )


def kernel_accuracy() -> None:
    """The fused kernels on bf16 inputs against fp32 references: CE + entropy of given logits
    (reference: log_softmax of the same bf16 values in fp32), and the fused output projection +
    CE + entropy (reference: the fp32 weights and hidden states, full fp32 logits)."""
    from megatron_rmt.entropy import vocab_parallel_ce_entropy
    from megatron_rmt.fused_linear import linear_ce_entropy

    n, v, h, chunk = (64, 512, 32, 16) if SMALL else (4096, 151936, 5120, 1024)
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(0)
    labels = torch.randint(0, v, (n,), device=dev, generator=g)

    logits = (torch.randn(n, v, device=dev, generator=g) * 3).bfloat16()
    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(x, labels, chunk_tokens=chunk)
    loss.sum().backward()
    ref = logits.float().requires_grad_()
    logp = torch.log_softmax(ref, -1)
    ref_loss = -logp.gather(1, labels[:, None]).squeeze(1)
    ref_loss.sum().backward()
    ref_entropy = -(logp.exp() * logp).sum(-1).detach()
    result(
        f"fused CE+entropy bf16 logits vs fp32 ({n} x {v})",
        f"loss max |diff| {float((loss - ref_loss).abs().max()):.1e}, entropy "
        f"{float((entropy - ref_entropy).abs().max()):.1e}, grad {_rel(x.grad, ref.grad):.1e} rel",
        "loss, entropy < 1e-4; grad rel < 1e-2 (bf16 grad)",
    )
    del x, ref, logp, logits

    hidden32 = torch.randn(n, h, device=dev, generator=g)
    weight32 = torch.randn(v, h, device=dev, generator=g) / 30
    ones = torch.ones(n, device=dev)
    hidden, weight = (t.bfloat16().requires_grad_() for t in (hidden32, weight32))
    loss, entropy = linear_ce_entropy(
        hidden, weight, labels, chunk_tokens=chunk, expected_grad=ones
    )
    loss.backward(ones)
    h32, w32 = hidden32.clone().requires_grad_(), weight32.clone().requires_grad_()
    logp = torch.log_softmax(h32 @ w32.t(), -1)
    ref_loss = -logp.gather(1, labels[:, None]).squeeze(1)
    ref_loss.backward(ones)
    ref_entropy = -(logp.exp() * logp).sum(-1).detach()
    result(
        f"fused linear+CE+entropy bf16 vs fp32 (h {h})",
        f"loss max |diff| {float((loss - ref_loss).abs().max()):.1e} (mean CE "
        f"{float(ref_loss.mean()):.2f}), entropy {float((entropy - ref_entropy).abs().max()):.1e}"
        f", grad hidden {_rel(hidden.grad, h32.grad):.1e} rel, weight {_rel(weight.grad, w32.grad):.1e} rel",
        "loss, entropy < 5e-2 (bf16 inputs); grads rel < 5e-2",
    )


def shared_prefix() -> None:
    """One GRPO group in the shared-prefix layout against the same group as rows, on this
    device: per-token log-probs of every response, fp32 and bf16. The control feeds the
    shared-prefix layout to the stock core attention (no switch to the arbitrary mask): on a
    GPU whose fused softmax ignores the mask it must differ, so the first rows show the mask
    is honoured where it would otherwise be dropped."""
    from rl_pass import group

    from megatron_rmt import parallel, rl_batch, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config, ModelConfig

    parallel.init()
    if SMALL:
        shape, vocab, prefix, g, lengths = dict(num_layers=2), 512, 24, 4, (4, 8)
    else:
        shape = dict(num_layers=4, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                     num_query_groups=4, kv_channels=128)  # fmt: skip
        vocab, prefix, g, lengths = 32000, 512, 8, (16, 64)
    one = [group(prefix, g, lengths, vocab)]
    layouts = {
        "rows": rl_batch.rows_batches(one, 0),
        "shared": rl_batch.shared_prefix_batches(one, 0),
    }
    for bf16 in (False, True):
        diffs = {}
        for spec in ("shared_prefix", "rows"):  # mask-honouring core attention, then stock
            cfg = Config(model=ModelConfig(**shape, rl_layout=spec, bf16=bf16,
                                           transformer_impl="local"))  # fmt: skip
            torch.manual_seed(0)
            trainable = build_trainable(cfg, vocab)
            logp = {}
            for name, mbs in layouts.items():
                out = step.reference_logprobs(trainable.model, mbs, 1.0, 1024)
                logp[name] = torch.cat([r[m.resp_mask > 0] for r, m in zip(out, mbs, strict=True)])
            diffs[spec] = float((logp["shared"] - logp["rows"]).abs().max())
            del trainable
        dtype = "bf16" if bf16 else "fp32"
        target = "< 1e-4" if not bf16 else "< 5e-2"
        result(f"shared-prefix vs rows, {dtype} ({g} x {lengths} after {prefix})",
               f"max |diff logp| {diffs['shared_prefix']:.1e}; stock attention (control) "
               f"{diffs['rows']:.1e}", f"{target}; control: report")  # fmt: skip


def _copy_local_into_te(local: torch.nn.Module, te: torch.nn.Module) -> None:
    """Same weights: TE fuses the pre-attention / pre-MLP norms into the next linear layer."""
    rename = {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }
    te_params = dict(te.named_parameters())
    copied = set()
    for name, p in local.named_parameters():
        target = name
        for old, new in rename.items():
            target = target.replace(old, new)
        te_params[target].data.copy_(p.data)
        copied.add(target)
    missing = set(te_params) - copied
    if missing:
        raise RuntimeError(f"TE parameters without a local counterpart: {sorted(missing)}")


def te_vs_local() -> None:
    from megatron_rmt import parallel, rl_batch
    from megatron_rmt.config import ModelConfig
    from megatron_rmt.model.builder import build_model
    from megatron_rmt.model.logits import forward_logits

    parallel.init()
    for layout in ("rows", "shared_prefix"):
        models = {}
        for impl in ("local", "transformer_engine"):
            cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=704,
                              num_attention_heads=4, num_query_groups=2, kv_channels=64,
                              transformer_impl=impl, rl_layout=layout)  # fmt: skip
            torch.manual_seed(0)
            models[impl] = build_model(cfg, 512).eval()
        _copy_local_into_te(models["local"], models["transformer_engine"])
        tokens = torch.randint(0, 512, (2, 256), device="cuda")
        positions = torch.arange(256, device="cuda").expand(2, 256)
        with torch.no_grad():
            if layout == "rows":
                out = {k: forward_logits(m, tokens, positions) for k, m in models.items()}
            else:  # a shared-prefix group through each spec's masked core attention
                from rl_pass import group

                (mb,) = rl_batch.shared_prefix_batches([group(96, 8, (8, 24), 512)], 0)
                mb = mb.to("cuda")
                out = {k: mb.logits(m) for k, m in models.items()}
        a, b = out["local"].float(), out["transformer_engine"].float()
        rel = float((a - b).abs().max() / a.abs().max())
        result(f"TE vs local logits ({layout})", f"max rel diff {rel:.1e}", "< 1e-2 (TF32)")


def _run(cmd: list[str], log: str) -> float:
    """Run one stage (its output appended to `log`); its wall-clock seconds. Fails loudly."""
    import subprocess

    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd[:4])} ... (log {log})")
    return time.perf_counter() - start


def rmt(out: str) -> None:
    """A short RMT run on this device with the embedded rollout engine, from nothing: the
    bundled corpus split into training documents and held-out ones; NTP pre-training of the
    benchmarks/gpu_check.yaml model from random initialisation; the format cold start; an
    evaluation set of held-out positions (easy / medium / hard by the cold-started model's
    entropy); NTR pass@1 there before and after the RMT steps."""
    import json

    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "rmt.log")
    py = sys.executable
    model = ["--config", f"{ROOT}/benchmarks/gpu_check.yaml"]
    if SMALL:  # the tiny CPU model and a handful of steps
        model = ["--config", f"{ROOT}/configs/tiny_cpu.yaml"]
        pre, steps, per_level, batch = (
            6,
            2,
            3,
            ["--global-batch-size", "4", "--micro-batch-size", "4"],
        )
    else:
        pre, steps, per_level, batch = (
            150,
            20,
            20,
            ["--global-batch-size", "8", "--micro-batch-size", "8"],
        )
    budgets = ["--budget-initial", "8", "--budget-min", "6", "--max-response-tokens", "24"]
    with open(f"{ROOT}/corpus/sample_math.jsonl") as fh:
        docs = fh.readlines()
    held = max(len(docs) // 10, 1)
    for name, part in (("train", docs[:-held]), ("heldout", docs[-held:])):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as fh:
            fh.writelines(part)
    tok = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
           f"{ROOT}/corpus/gpt2_tokenizer/vocab.json", "--merge-file",
           f"{ROOT}/corpus/gpt2_tokenizer/merges.txt"]  # fmt: skip
    data = os.path.join(out, "data", "train_text_document")
    seconds = {}
    seconds["preprocess"] = _run([py, "tools/preprocess_data.py", "--input",
        os.path.join(out, "train.jsonl"), "--output-prefix", os.path.join(out, "data", "train"),
        *tok, "--append-eod", "--workers", "1"], log)  # fmt: skip
    seconds["pre-train"] = _run([py, "-m", "megatron_rmt.train", *model, "--rmt-variant", "ntp",
        "--data-path", data, "--train-iters", str(pre), "--lr", "3e-3", "--log-interval", "25",
        "--metrics-file", os.path.join(out, "pretrain.jsonl"),
        "--save", os.path.join(out, "pretrain")], log)  # fmt: skip
    seconds["cold start"] = _run([py, "-m", "megatron_rmt.coldstart", *model,
        f"{ROOT}/configs/coldstart_tiny.yaml", *budgets, "--load", os.path.join(out, "pretrain"),
        "--data-path", data, "--save", os.path.join(out, "coldstart")], log)  # fmt: skip
    evalset = os.path.join(out, "set.jsonl")
    _run([py, "-m", "megatron_rmt.evaluate", "build-set", "--eval-data",
          os.path.join(out, "heldout.jsonl"), "--output", evalset, "--per-level", str(per_level),
          "--sample-seed", "1234", "--bucket-mode", "quantile", *model, *budgets,
          "--load", os.path.join(out, "coldstart")], log)  # fmt: skip
    ntr = ["--eval-set", evalset, "--samples", "4", "--budget", "8"]
    for when, load in (("before", "coldstart"), ("after", "rmt")):
        if when == "after":
            seconds["rmt"] = _run([py, "-m", "megatron_rmt.train", *model, *budgets, *batch,
                "--bucket-mode", "quantile", "--lr", "3e-4", "--train-iters", str(steps),
                "--data-path", data, "--load", os.path.join(out, "coldstart"), "--no-load-optim",
                "--save", os.path.join(out, "rmt"), "--save-interval", "1000",
                "--metrics-file", os.path.join(out, "metrics.jsonl")], log)  # fmt: skip
        _run([py, "-m", "megatron_rmt.evaluate", "run", *ntr, "--output",
              os.path.join(out, f"ntr_{when}.json"), "--name", when, *model, *budgets,
              "--load", os.path.join(out, load)], log)  # fmt: skip
    with open(os.path.join(out, "pretrain.jsonl")) as fh:
        pre_rows = [json.loads(line) for line in fh]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    ntr_of = {}
    for when in ("before", "after"):
        with open(os.path.join(out, f"ntr_{when}.json")) as fh:
            ntr_of[when] = json.load(fh)["ntr"]
    step_s = sum(r["step_time"] for r in rows) / len(rows)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    result("RMT: pre-train from random init",
           f"{pre} steps in {seconds['pre-train']:.0f} s, NTP loss {pre_rows[0]['ntp_loss']:.2f} "
           f"-> {pre_rows[-1]['ntp_loss']:.2f}; cold start {seconds['cold start']:.0f} s",
           "loss falls")  # fmt: skip
    result(f"RMT: {steps} steps, embedded engine",
           f"{1 / step_s:.2f} steps/s ({step_s:.2f} s/step, run {seconds['rmt']:.0f} s); reward "
           f"{mean('reward'):.3f}, match acc {mean('match_acc'):.3f}, zero-adv share "
           f"{mean('zero_adv_share'):.2f}, unparsed {mean('unparsed_share'):.2f}",
           "reward > 0")  # fmt: skip
    a, b = ntr_of["before"]["all"], ntr_of["after"]["all"]
    result("RMT: held-out NTR pass@1 before -> after",
           f"{a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] -> {b['accuracy']:.3f} "
           f"[{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] (n {b['n']}, {held} held-out documents)",
           "report (95% intervals)")  # fmt: skip


def mfu() -> None:
    from step_model import Shape

    from megatron_rmt import parallel, selection, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config, ModelConfig

    parallel.init()
    shape = dict(ONE_B)
    if SMALL:
        shape.update(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=64,
                     bf16=False)  # fmt: skip
    cfg = ModelConfig(**shape)
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=cfg), cfg.vocab_size)
    seq, n_mb = cfg.seq_length, 2 if SMALL else 8
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1))
    mb = {
        "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq),
        "position_ids": torch.arange(seq)[None], "context_len": torch.arange(1, seq + 1)[None],
        "sample_ids": torch.tensor([0]),
    }  # fmt: skip
    sel = selection.Selector(None, (1.0, 0.0, 0.0), 1, None, 0, 1, 0)
    for chunk in (0, 1024):  # the logits path, then the fused linear + CE + entropy
        step.ntp_pass(trainable, [mb] * 2, sel, 1.0, 4096, fused_linear_chunk=chunk)  # warm-up
        _sync()
        t0 = time.perf_counter()
        step.ntp_pass(trainable, [mb] * n_mb, sel, 1.0, 4096, fused_linear_chunk=chunk)
        _sync()
        seconds = time.perf_counter() - t0
        dims = Shape(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size,
                     cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels,
                     cfg.vocab_size)  # fmt: skip
        flops = dims.train_flops(n_mb * seq, seq / 2, n_mb * seq)
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        what = "fused linear" if chunk else "logits"
        value = f"{flops / seconds / 1e12:.0f} TFLOP/s"
        if peak:
            value += f" = {flops / seconds / peak:.0%} MFU"
        size = "toy fp32" if SMALL else "1.6B bf16 (1.0B non-emb.)"
        result(f"NTP pass {size}, {what}", value, ">= 40% (H100/H200)")


def kernels(*flags: str) -> None:
    """benchmarks/entropy.py with `flags`, its table as RESULT lines."""
    import subprocess

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "entropy.py"), *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    linear = "--hidden" in flags
    target = "workspace <= 1/8, time <= 1.1x" if linear else "peak <= 1/8, time <= 1x"
    for line in out.splitlines():
        if line.startswith(("naive", "fused", "linear")):
            s, peak, work, t_ratio, p_ratio = line[18:].split()
            name = f"{'linear+CE' if linear else 'CE'} {line[:18].strip()}"
            value = (
                f"{s} s, peak {peak} GiB, workspace {work} GiB, x{t_ratio} time, x{p_ratio} peak"
            )
            result(name, value, target)


def _receiver(rank: int, size: int, port: int, nbytes: int) -> None:
    """Rank 1: receive the broadcast weights (NCCL, two GPUs)."""
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)  # fmt: skip
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(4):
        dist.broadcast(buf, 0)
    torch.cuda.synchronize()
    dist.destroy_process_group()


def _ipc_copier(shared, queue) -> None:
    """Another process on the same GPU: copy the shared weights into its own memory."""
    mine = torch.empty_like(shared)
    mine.copy_(shared)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        mine.copy_(shared)
    torch.cuda.synchronize()
    queue.put(4 * shared.numel() * 2 / (time.perf_counter() - t0) / 1e9)


def transfer() -> None:
    """NCCL broadcast of 1.5B bf16 weights between two GPUs; with one GPU (NCCL refuses two
    ranks on one device) a CUDA-IPC copy from another process on the same GPU instead."""
    import socket

    import torch.multiprocessing as mp

    nbytes = 2 * 1_500_000_000
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    if torch.cuda.device_count() >= 2:
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        peer = ctx.Process(target=_receiver, args=(1, 2, port, nbytes))
        peer.start()
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=2)  # fmt: skip
        buf = torch.randn(nbytes // 2, device="cuda").bfloat16()
        dist.broadcast(buf, 0)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dist.broadcast(buf, 0)
        torch.cuda.synchronize()
        rate = 3 * nbytes / (time.perf_counter() - t0) / 1e9
        peer.join()
        result("weight transfer, NCCL broadcast 2 GPUs", f"{rate:.0f} GB/s", "report")
        return
    shared = torch.randn(nbytes // 2, device="cuda").bfloat16()
    peer = ctx.Process(target=_ipc_copier, args=(shared, queue))
    peer.start()
    rate = queue.get()
    peer.join()
    result("weight transfer, CUDA IPC copy 1 GPU", f"{rate:.0f} GB/s", "report (no NCCL: 1 GPU)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parts = {"te-vs-local": te_vs_local, "kernels": kernels, "mfu": mfu, "transfer": transfer,
             "precision": precision, "kernel-accuracy": kernel_accuracy,
             "shared-prefix": shared_prefix, "rmt": rmt}  # fmt: skip
    args = sys.argv[2:]
    if args[:1] == ["--small"]:
        SMALL, args = True, args[1:]
    parts[sys.argv[1]](*args)
