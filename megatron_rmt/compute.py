"""The compute a training step spends, in FLOPs: its NTP pass, its RL pass (and the reference
model's forward with a KL term), and the rollouts' generation, so that runs of different methods
can be compared at equal compute.

The rules (Megatron-LM's accounting, stated once here):
- A forward over one token at context length c: 2 FLOPs per multiply-add of every matmul of
  every layer (QKV, output projection, SwiGLU gate, up and down), attention scores and weighted
  values over the whole context (4 c q, no causal halving), and, where logits are computed, the
  output layer (2 h v). A backward costs twice the forward.
- A pass over a microbatch counts every position it computes, padding included, at the
  microbatch's length; shared-prefix RL rows compute logits only where a response label is.
- Generation: each request's prompt once, like a window of its length (the G samples share
  its prefill, as vLLM's `n` does; its last logits give every sample's first token), then each
  sampled token but the last fed back, token k at context p + k (n - 1 tokens of mean context
  p + n / 2: exact, the count being linear in c).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Computed:
    """What one forward computed: `tokens` positions at context `context`, logits on
    `logit_rows` of them."""

    tokens: int
    context: float
    logit_rows: int


def _layer_flops(m, context: float) -> float:
    """Forward FLOPs of one token through one transformer layer at context `context`."""
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, 2 * m.num_query_groups * d
    return 2 * h * (q + kv) + 2 * 2 * context * q + 2 * q * h + 2 * h * 2 * f + 2 * f * h


def forward_flops(m, vocab_size: int, c: Computed) -> float:
    return c.tokens * m.num_layers * _layer_flops(m, c.context) + c.logit_rows * 2 * (
        m.hidden_size * vocab_size
    )


def train_flops_per_token(m, vocab_size: int, seq_length: int) -> float:
    """Forward + backward FLOPs per trained token of a `seq_length` window (MFU's numerator)."""
    return 3.0 * forward_flops(m, vocab_size, Computed(1, seq_length, 1))


def pass_flops(m, vocab_size: int, computed: list[Computed], backward: bool) -> float:
    forward = sum(forward_flops(m, vocab_size, c) for c in computed)
    return 3.0 * forward if backward else forward


def window_computed(microbatches: list[dict]) -> list[Computed]:
    """The NTP pass's microbatches `[b, s]`: every position, logits everywhere."""
    out = []
    for mb in microbatches:
        b, s = mb["tokens"].shape
        out.append(Computed(b * s, s, b * s))
    return out


def rollout_flops(m, vocab_size: int, groups: list) -> float:
    """Generation of every served group's responses (problems.Group: request, result)."""
    total = 0.0
    for g in groups:
        p = len(g.request.prompt_ids)
        total += forward_flops(m, vocab_size, Computed(p, p, 1))  # prefill; logits of the last
        for response in g.result.responses:
            n = len(response)
            if n > 1:
                total += forward_flops(m, vocab_size, Computed(n - 1, p + n / 2, n - 1))
    return total


def step_flops(m, vocab_size: int, windows: list[dict], ntp_backward: bool, rl, groups) -> dict:
    """This replica's FLOPs of one step: the NTP pass over `windows` (backward unless its
    weight is 0), the RL pass and reference forward of `rl` (step.RLOutcome), the generation of
    `groups`."""
    return {
        "flops_ntp": pass_flops(m, vocab_size, window_computed(windows), ntp_backward),
        "flops_rl": pass_flops(m, vocab_size, rl.computed, True)
        + pass_flops(m, vocab_size, rl.reference_computed, False),
        "flops_rollout": rollout_flops(m, vocab_size, groups),
    }
