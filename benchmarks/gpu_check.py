"""The Python parts of benchmarks/gpu_check.sh; each prints one `RESULT <name> | <value> | <target>`
line that the script gathers into its table.

    python benchmarks/gpu_check.py te-vs-local   # TE layer spec vs local spec: same logits
    python benchmarks/gpu_check.py kernels FLAGS # benchmarks/entropy.py FLAGS, as RESULT lines
    python benchmarks/gpu_check.py mfu           # NTP-pass MFU of a 1.6B Qwen3-shaped model
    python benchmarks/gpu_check.py transfer      # weight-transfer GB/s between two processes
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


def result(name: str, value: str, target: str) -> None:
    print(f"RESULT {name} | {value} | {target}", flush=True)


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


def mfu() -> None:
    from step_model import Shape

    from megatron_rmt import parallel, selection, step
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import Config, ModelConfig

    parallel.init()
    cfg = ModelConfig(**ONE_B)
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=cfg), cfg.vocab_size)
    seq, n_mb = cfg.seq_length, 8
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1))
    mb = {
        "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq),
        "position_ids": torch.arange(seq)[None], "context_len": torch.arange(1, seq + 1)[None],
        "sample_ids": torch.tensor([0]),
    }  # fmt: skip
    sel = selection.Selector(None, (1.0, 0.0, 0.0), 1, None, 0, 1, 0)
    for chunk in (0, 1024):  # the logits path, then the fused linear + CE + entropy
        step.ntp_pass(trainable, [mb] * 2, sel, 1.0, 4096, fused_linear_chunk=chunk)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step.ntp_pass(trainable, [mb] * n_mb, sel, 1.0, 4096, fused_linear_chunk=chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        shape = Shape(16, 2048, 8192, 16, 8, 128, cfg.vocab_size)
        flops = shape.train_flops(n_mb * seq, seq / 2, n_mb * seq)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        what = "fused linear" if chunk else "logits"
        value = f"{flops / seconds / 1e12:.0f} TFLOP/s"
        if peak:
            value += f" = {flops / seconds / peak:.0%} MFU"
        result(f"NTP pass 1.6B bf16 (1.0B non-emb.), {what}", value, ">= 40% (H100/H200)")


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
    parts = {"te-vs-local": te_vs_local, "kernels": kernels, "mfu": mfu, "transfer": transfer}
    parts[sys.argv[1]](*sys.argv[2:])
