"""The memory model: parameter counts against a hand count, activation counts against what
autograd really keeps, and the 14B dry runs (CI) predicting a fit in 80 GB."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from distributed import spawn

from megatron_rmt import memory
from megatron_rmt.config import ModelConfig
from megatron_rmt.dryrun import meta_params
from megatron_rmt.model.builder import build_model


def _hand_count(m: ModelConfig, vocab: int) -> int:
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    layer = h * (q + 2 * kv) + q * h + h * 2 * f + f * h + 2 * h
    layer += 2 * d if m.qk_layernorm else 0
    layer += q + 2 * kv if m.add_qkv_bias else 0
    output = vocab * h if m.untie_embeddings_and_output_weights else 0
    return m.num_layers * layer + vocab * h + output + h


QWEN3_14B = ModelConfig(
    num_layers=40, hidden_size=5120, ffn_hidden_size=17408, num_attention_heads=40,
    num_query_groups=8, kv_channels=128, vocab_size=151936,
)  # fmt: skip


def count_on_meta(m, vocab):
    return meta_params(m, vocab)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_parameter_counts_match_a_hand_count(family):
    m = ModelConfig(
        model_family=family, num_layers=2, hidden_size=64, ffn_hidden_size=176,
        num_attention_heads=4, num_query_groups=2, kv_channels=16,
    )  # fmt: skip
    (params,) = spawn(count_on_meta, 1, args=(m, 256))
    assert params.per_rank(2, 1, 1) == _hand_count(m, 256)
    # TP 2 splits everything but the norms (2 per layer + QK-norms + final)
    norms = 2 * 64 + (2 * 16 if family == "qwen3" else 0)
    assert params.per_rank(2, 2, 1) == (_hand_count(m, 256) - 2 * norms - 64) // 2 + 2 * norms + 64


def saved_per_token(m, rows, seq):
    """Bytes autograd keeps per token in one layer's forward, parameters excluded (CPU, fp32)."""
    model = build_model(m, 256)
    layer = model.decoder.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(seq, rows, m.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(seq))
    kept.pop(x.untyped_storage().data_ptr(), None)  # the layer input: the previous layer's output
    return sum(kept.values()) / (rows * seq)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_activation_count_is_what_autograd_keeps(family):
    m = ModelConfig(
        model_family=family, num_layers=1, hidden_size=128, ffn_hidden_size=352,
        num_attention_heads=4, num_query_groups=2, kv_channels=32,
    )  # fmt: skip
    (measured,) = spawn(saved_per_token, 1, args=(m, 2, 96))
    predicted = memory.layer_activation_elements(m, 1, 96, fused=False) * 4
    # the layer input is the previous layer's output: counted once per layer in the model
    assert abs(predicted - m.hidden_size * 4 - measured) / measured < 0.03


def test_recompute_and_sequence_parallel_shrink_activations():
    params = memory.Params(10**8, 10**4, 10**8, 10**8, 5120)
    work = memory.Workload(4096, 8, 6144)
    layout = memory.Layout(tp=8, pp=1, dp=2)

    def peak_act(**kw):
        m = dataclasses.replace(QWEN3_14B, bf16=True, **kw)
        return memory.predict(m, layout, params, work, gpu=True).rl_activations

    plain = peak_act()
    sp = peak_act(sequence_parallel=True)
    full = peak_act(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)  # fmt: skip
    assert full < sp < plain
    # naive: per token per layer, 4h bf16 replicated + the rest / TP, x 40 layers + 1 working
    h, q, kv, f = 5120, 5120, 1024, 17408
    per_layer = (4 * h + (q + kv + q + f + 2 * q + 2 * kv + 2 * f) / 8) * 2
    assert plain == pytest.approx(per_layer * 8 * 6144 * 41)


# The 14B configs' shapes (configs/*.yaml): layers, h, f, vocab, QK-norm, QKV bias.
SHAPES_14B = {
    "qwen3_14b": (40, 5120, 17408, 151936, True, False),
    "r1_distill_qwen_14b": (48, 5120, 13824, 152064, False, True),
}


def _hand_count_14b(name: str) -> dict[str, float]:
    """Each row of the dry run's table, in GiB, counted by hand for the configs' layout on 16
    GPUs: TP 8, PP 1, so DP 2; bf16 with fp32 main grads and Adam (fp32 master, m, v) sharded
    over the 2 replicas by the distributed optimizer; sequence parallel, full recompute of
    every layer; no KL reference; one window of 4096 tokens, an RL microbatch of G = 8 rows of
    4096 + 2048 tokens."""
    layers, h, f, vocab, qk_norm, qkv_bias = SHAPES_14B[name]
    tp, dp, d = 8, 2, 128
    q, kv = 40 * d, 8 * d
    sharded = h * (q + 2 * kv) + q * h + h * 2 * f + f * h + (q + 2 * kv if qkv_bias else 0)
    replicated = 2 * h + (2 * d if qk_norm else 0)  # the two RMSNorms and the QK-norms
    n = layers * (sharded // tp + replicated) + 2 * vocab * h // tp + h  # + embedding, output
    rl_tokens, ntp_tokens = 8 * (4096 + 2048), 4096

    def activations(tokens):  # bf16; recompute keeps each layer's input (h / TP with SP)
        per_token = 4 * h / tp + (q + f + 2 * q + 2 * kv + 2 * f + (q + kv if qk_norm else 0)) / tp
        one_layer = per_token * 2 * tokens  # rebuilt for the backward: once, plus a working set
        return layers * h / tp * 2 * tokens + 2 * one_layer

    gib = 1024**3
    rows = {
        "weights": 2 * n,
        "fp32 main grads": 4 * n,
        "optimizer state": 12 * n / dp,  # 10.3 GiB at 14B; 20.6 without the DP shard
        "reference model": 0,
        "NTP activations": activations(ntp_tokens),
        "RL activations": activations(rl_tokens),
        "logits (larger pass)": rl_tokens * vocab / tp * 2,
        "optimizer transient": 0,  # fused Adam on GPU
        "runtime overhead": 3 * gib,
    }
    rows["predicted peak"] = (
        sum(rows.values()) - rows["NTP activations"] - rows["optimizer transient"]
    )  # the RL pass is the larger
    return {k: v / gib for k, v in rows.items()}


@pytest.mark.parametrize("name", ["qwen3_14b", "r1_distill_qwen_14b"])
def test_dry_run_of_the_14b_configs_fits_in_80gb(name):
    env = {**os.environ, "WORLD_SIZE": "16", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rmt.train", "--config", f"configs/{name}.yaml",
         "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = float(re.search(r"predicted per-GPU peak ([\d.]+) GiB", proc.stdout).group(1))
    assert 15 < peak < 80, proc.stdout
    assert "TP 8 x PP 1 x DP 2; RL microbatch 8 rows x 6144 tokens" in proc.stdout
    printed = {
        row.group(1).strip(): float(row.group(2))
        for row in re.finditer(r"^  (\S.*?)\s+([\d.]+) GiB$", proc.stdout, re.M)
    }
    expected = _hand_count_14b(name)
    assert printed.keys() == expected.keys(), proc.stdout
    for row, gib in expected.items():  # printed to 0.01 GiB
        assert printed[row] == pytest.approx(gib, abs=0.006), (row, printed[row], gib)
