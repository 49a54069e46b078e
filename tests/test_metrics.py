"""The FLOP count behind MFU, against a count written out by hand for one small shape."""

from megatron_rmt.config import ModelConfig
from megatron_rmt.metrics import train_flops_per_token


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
