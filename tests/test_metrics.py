"""The FLOP counts behind MFU and the compute column, against counts written out by hand."""

import pytest
from distributed import spawn
from test_train import ScriptedEngine, _flags

from megatron_rmt import config, launch, train
from megatron_rmt.compute import train_flops_per_token
from megatron_rmt.config import ModelConfig


def test_flops_per_token_by_hand():
    m = ModelConfig(
        num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
        num_query_groups=1, kv_channels=4,
    )  # fmt: skip
    seq, vocab = 10, 32
    qkv = 2 * 8 * (2 * 4 + 2 * 1 * 4)  # q: 2 heads x 4, k and v: 1 group x 4 each
    attention = 2 * 2 * seq * 8  # scores and weighted values
    proj = 2 * 8 * 8
    mlp = 2 * 8 * 32 + 2 * 16 * 8  # gate+up, down
    forward = 2 * (qkv + attention + proj + mlp) + 2 * 8 * vocab
    assert train_flops_per_token(m, vocab, seq) == 3 * forward


class RecordingEngine(ScriptedEngine):
    """The scripted engine, keeping the requests it was sent."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.sent = []

    def generate(self, requests):
        results = super().generate(requests)
        self.sent += list(zip(requests, results, strict=True))
        return results


def one_recorded_step(argv):
    run = launch.setup(config.parse(argv))
    run.engine = RecordingEngine(run.tokenizer)
    metrics = train.train_step(run, 0)
    pairs = [(len(q.prompt_ids), [len(r) for r in res.responses]) for q, res in run.engine.sent]
    return metrics, pairs, run.trainable.model[0].module.vocab_size


def test_step_flops_by_hand(tiny_corpus):
    """One RMT step of the tiny model (rows layout, KL to a reference): the NTP pass, the RL
    pass with the reference forward, and generation, each against a count by hand."""
    argv = _flags(tiny_corpus, iters=1, extra=["--kl-beta", "0.1"])
    ((metrics, pairs, vocab),) = spawn(one_recorded_step, 1, args=(argv,))
    h, f, layers, q, kv = 64, 176, 2, 4 * 16, 2 * 2 * 16  # configs/tiny_cpu.yaml

    def token(context, logits=True):  # one token's forward, multiply-adds x 2
        per_layer = 2 * h * (q + kv) + 4 * context * q + 2 * q * h + 2 * h * 2 * f + 2 * f * h
        return layers * per_layer + (2 * h * vocab if logits else 0)

    seq, windows = 128, 4  # global batch 4 windows of 128 tokens, NTP weight > 0: backward too
    assert metrics["flops_ntp"] == 3 * windows * seq * token(seq)
    assert pairs and metrics["zero_adv_share"] == 0  # every group trains
    longest = max(p + n for p, lengths in pairs for n in lengths) - 1  # rows padded to it
    rows = sum(len(lengths) for _, lengths in pairs)
    rl_forward = rows * longest * token(longest)
    assert metrics["flops_rl"] == pytest.approx(3 * rl_forward + rl_forward, rel=1e-12)
    generated = 0
    for p, lengths in pairs:
        generated += (p - 1) * token(p, logits=False) + token(p)  # prefill, logits of the last
        for n in lengths:  # token k = 1 .. n-1 fed back at context p + k
            generated += sum(token(p + k) for k in range(1, n))
    assert metrics["flops_rollout"] == pytest.approx(generated, rel=1e-12)
    total = metrics["flops_ntp"] + metrics["flops_rl"] + metrics["flops_rollout"]
    assert metrics["flops"] == pytest.approx(total, rel=1e-12)


def test_mixed_groups_against_a_loop():
    """A group counts when it holds both an exact hit (match 1) and a miss; RPT's partial
    prefix rewards (0 < match < 1) are misses."""
    import torch

    from megatron_rmt.metrics import mixed_groups

    match = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 1.0, 1.0], [0.5, 0.5, 0.0]]
    )
    naive = sum(1 for row in match.tolist() if 1.0 in row and any(x != 1.0 for x in row))
    assert mixed_groups(match) == naive == 2
    assert mixed_groups(torch.zeros(0, 4)) == 0
