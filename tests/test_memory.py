"""The memory model: parameter counts against a hand count, activation counts against what
autograd really keeps, and the 14B dry runs (CI) predicting a fit in 80 GB."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import rl_groups
import torch
from conftest import ROOT
from distributed import spawn

from megatron_rmt import memory
from megatron_rmt.config import ModelConfig
from megatron_rmt.dryrun import meta_params
from megatron_rmt.model.builder import build_model
from megatron_rmt.model.shared_prefix import block_mask
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult


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


def saved_per_token(m, rows, seq, segments=None):
    """Bytes autograd keeps per token in one layer's forward, parameters excluded (CPU, fp32);
    with `segments` `[rows, seq]`, under the shared-prefix mask they give."""
    model = build_model(m, 256)
    mask = None if segments is None else block_mask(segments)
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
        layer(x, attention_mask=mask, rotary_pos_emb=model.rotary_pos_emb(seq))
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


def test_shared_prefix_activation_count_is_what_autograd_keeps():
    """CPU: Megatron's local attention under the mask keeps 3q + a s per token, and the mask."""
    m = ModelConfig(
        num_layers=1, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, rl_layout="shared_prefix",
    )  # fmt: skip
    seq = 96  # two rows of a prompt of 32, then 4 responses of 16
    segments = torch.arange(seq).sub(16).div(16, rounding_mode="floor").clamp(min=0)
    (measured,) = spawn(saved_per_token, 1, args=(m, 2, seq, segments.expand(2, seq)))
    per_token = memory.layer_activation_elements(m, 1, seq, fused=False, masked=True) * 4
    predicted = per_token - m.hidden_size * 4 + seq  # the input; the [s, s] bool mask / s
    assert abs(predicted - measured) / measured < 0.03


def test_shared_prefix_workload_is_the_batch_rl_batch_builds():
    """The dry run's worst shared-prefix microbatch: a group of G full-length responses after a
    prompt, as one row of rl_batch.shared_prefix_batches, with logits at every response token."""
    prompt, g, response = 12, 3, 5
    req = RolloutRequest(list(range(1, prompt + 1)), g, response, 1.0, 1.0, 0)
    res = RolloutResult([[7] * response] * g, [[-0.1] * response] * g, 0)
    (mb,) = rl_groups.shared([req], [res], torch.zeros(1, g))
    work = memory.shared_prefix_workload(0, g, prompt, response)
    assert (work.rl_rows, work.rl_length) == tuple(mb.tokens.shape) == (1, 12 + 3 * 4)
    assert work.rl_logit_tokens == mb.rows.numel() == int(mb.resp_mask.sum()) == 15
    assert work.rl_masked


def test_masked_core_attention_on_gpu_against_a_hand_count():
    """TE's unfused attention: Q, K, V per head and the probabilities; torch's fp32 softmax also
    keeps its output and TE's per-layer mask, the fused masked-softmax kernel only its output."""
    m = dataclasses.replace(QWEN3_14B, bf16=True)
    q, kv, a = 5120, 1024, 40
    assert memory.core_attention_elements(m, 8, 6144, 8, True, False) == (2 * q + 2 * kv, 0)
    # TP 8: 5 heads a rank, not a multiple of 4: torch's softmax (3 bf16 elements a score)
    s = 20472
    assert memory.core_attention_elements(m, 8, s, 1, True, True) == (3 * q + 3 * a * s, s / 2)
    # TP 10: 4 heads a rank, s < 16384 and % 8: the kernel's bf16 output alone
    assert memory.core_attention_elements(m, 10, 8192, 1, True, True) == (3 * q + a * 8192, 0)
    fp32 = dataclasses.replace(m, bf16=False)  # torch's softmax: its fp32 output is the probs
    assert memory.core_attention_elements(fp32, 10, 8192, 1, True, True) == (
        3 * q + a * 8192, 8192 / 4,
    )  # fmt: skip


SMALL = ModelConfig(  # no QK-norm
    model_family="llama", num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
    num_query_groups=2, kv_channels=32, vocab_size=1024, seq_length=256, bf16=True,
)  # fmt: skip
SMALL_PARAMS = memory.Params(10**6, 10**3, 10**6, 10**6, 256)


def test_shared_prefix_rl_pass_against_a_hand_count():
    """TP 2, no recompute, a group of G = 4 responses of 64 after a 256-token prompt: one row of
    256 + 4 x 63 tokens; every layer keeps TE's masked-attention terms, the model keeps one mask,
    and only the 4 x 64 response positions are projected."""
    layout = memory.Layout(tp=2)
    work = memory.shared_prefix_workload(256, 4, 256, 64)
    est = memory.predict(SMALL, layout, SMALL_PARAMS, work, gpu=True, ce_chunk=128)
    s, h, f, q, kv, a, v = 256 + 4 * 63, 256, 704, 256, 64, 8, 512  # v: 1024 / TP
    # s % 8 != 0: no fused masked softmax; torch's fp32 one and TE's per-layer mask (s / 2)
    per_token = 4 * h + (q + f + 3 * q + 3 * a * s + 2 * f) / 2 + s / 2  # elements, bf16
    one_layer = per_token * 2 * s
    assert est.rl_activations == pytest.approx(4 * one_layer + s * s + one_layer)
    assert est.rl_logits == pytest.approx(4 * 64 * v * 2 + 128 * v * 4)
    rows = memory.predict(
        SMALL, layout, SMALL_PARAMS, memory.Workload(256, 4, 256 + 64), gpu=True, ce_chunk=128
    )  # the same group as 4 rows of prompt + response, flash attention, logits at every token
    flash = (4 * h + (q + f + 2 * q + 2 * kv + 2 * f) / 2) * 2 * 4 * 320
    assert rows.rl_activations == pytest.approx(5 * flash)
    assert rows.rl_logits == pytest.approx(4 * 320 * v * 2 + 128 * v * 4)


def test_fused_linear_replaces_the_ntp_logits_by_its_buffers():
    """The NTP pass's `[4096, v/TP]` logits and the CE kernel's fp32 chunk buffer, against
    fused_linear.py's chunk buffers (bf16 logits, fp32 copy, fp32 exp) and the two gradients its
    forward makes (`[tokens, h]` and `[v/TP, h]`, bf16); only the NTP term changes."""
    m = dataclasses.replace(SMALL, seq_length=4096)
    layout = memory.Layout(tp=2)
    work = memory.Workload(4096, 1, 64)  # the NTP pass is the larger one
    plain = memory.predict(m, layout, SMALL_PARAMS, work, gpu=True, ce_chunk=1024)
    fused = memory.predict(
        m, layout, SMALL_PARAMS, work, gpu=True, ce_chunk=1024, fused_linear_chunk=256
    )
    v, h = 512, 256
    assert plain.ntp_logits == 4096 * v * 2 + 1024 * v * 4
    assert fused.ntp_logits == 256 * v * (2 + 4 + 4) + (4096 + v) * h * 2
    assert dataclasses.replace(fused, ntp_logits=plain.ntp_logits) == plain
    assert fused.peak - plain.peak == pytest.approx(fused.ntp_logits - plain.ntp_logits)


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


def _hand_count_14b(name: str, shared_prefix: bool = False) -> dict[str, float]:
    """Each row of the dry run's table, in GiB, counted by hand for the configs' layout on 16
    GPUs: TP 8, PP 1, so DP 2; bf16 with fp32 main grads and Adam (fp32 master, m, v) sharded
    over the 2 replicas by the distributed optimizer; sequence parallel, full recompute of
    every layer; no KL reference; one window of 4096 tokens, an RL microbatch of G = 8 rows of
    4096 + 2048 tokens. `shared_prefix`: sequence parallelism off, the RL microbatch one row of
    4096 + 8 x 2047 tokens under TE's unfused masked attention, and the fused linear (chunks of
    1024) in the NTP pass."""
    layers, h, f, vocab, qk_norm, qkv_bias = SHAPES_14B[name]
    tp, dp, d, a = 8, 2, 128, 40
    q, kv, v = a * d, 8 * d, vocab / tp
    sharded = h * (q + 2 * kv) + q * h + h * 2 * f + f * h + (q + 2 * kv if qkv_bias else 0)
    replicated = 2 * h + (2 * d if qk_norm else 0)  # the two RMSNorms and the QK-norms
    n = layers * (sharded // tp + replicated) + 2 * vocab * h // tp + h  # + embedding, output
    sp = 1 if shared_prefix else tp

    def activations(tokens, attention=2 * q + 2 * kv, per_rank=0.0, mask=0):
        # bf16; recompute keeps each layer's input (h / TP with SP)
        rest = (q + f + 2 * f + (q + kv if qk_norm else 0)) / tp
        per_token = 4 * h / sp + rest + attention / tp + per_rank
        one_layer = per_token * 2 * tokens  # rebuilt for the backward: once, plus a working set
        return layers * h / sp * 2 * tokens + mask + 2 * one_layer

    ce = 1024 * v * 4  # the CE + entropy kernel's fp32 chunk buffer
    if shared_prefix:
        s = 4096 + 8 * 2047  # 5 heads a rank: torch's fp32 softmax, TE's per-layer mask
        rl_act = activations(s, 3 * q + 3 * a * s, s / 2, s * s)
        rl_logits = 8 * 2048 * v * 2 + ce
        ntp_logits = 1024 * v * (2 + 4 + 4) + (4096 + v) * h * 2
    else:
        rl_act = activations(8 * (4096 + 2048))
        rl_logits = 8 * 6144 * v * 2 + ce
        ntp_logits = 4096 * v * 2 + ce
    gib = 1024**3
    rows = {
        "weights": 2 * n,
        "fp32 main grads": 4 * n,
        "optimizer state": 12 * n / dp,  # 10.3 GiB at 14B; 20.6 without the DP shard
        "reference model": 0,
        "NTP activations": activations(4096),
        "RL activations": rl_act,
        "NTP logits": ntp_logits,
        "RL logits": rl_logits,
        "optimizer transient": 0,  # fused Adam on GPU
        "runtime overhead": 3 * gib,
    }
    rows["predicted peak"] = (
        sum(rows.values()) - rows["NTP activations"] - rows["NTP logits"]
    )  # the RL pass is the larger
    return {k: v / gib for k, v in rows.items()}


def _dry_run(name: str, *flags: str) -> str:
    env = {**os.environ, "WORLD_SIZE": "16", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rmt.train", "--config", f"configs/{name}.yaml",
         "--dry-run", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _check_rows(stdout: str, expected: dict[str, float]) -> None:
    printed = {
        row.group(1).strip(): float(row.group(2))
        for row in re.finditer(r"^  (\S.*?)\s+([\d.]+) GiB$", stdout, re.M)
    }
    assert printed.keys() == expected.keys(), stdout
    for row, gib in expected.items():  # printed to 0.01 GiB
        assert printed[row] == pytest.approx(gib, abs=0.006), (row, printed[row], gib)


@pytest.mark.parametrize("name", ["qwen3_14b", "r1_distill_qwen_14b"])
def test_dry_run_of_the_14b_configs_fits_in_80gb(name):
    stdout = _dry_run(name)
    peak = float(re.search(r"predicted per-GPU peak ([\d.]+) GiB", stdout).group(1))
    assert 15 < peak < 80, stdout
    assert "TP 8 x PP 1 x DP 2; RL microbatch 8 rows x 6144 tokens" in stdout
    _check_rows(stdout, _hand_count_14b(name))


def test_dry_run_with_shared_prefix_and_fused_linear():
    """What the configs would predict with both exact paths on, which needs SP off (docs)."""
    stdout = _dry_run(
        "qwen3_14b", "--no-sequence-parallel", "--rl-layout", "shared_prefix",
        "--fused-linear-chunk-tokens", "1024",
    )  # fmt: skip
    assert "RL microbatch 1 rows x 20472 tokens" in stdout
    _check_rows(stdout, _hand_count_14b("qwen3_14b", shared_prefix=True))
