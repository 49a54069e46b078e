"""The bf16 branches of the fused kernels (entropy.py, fused_linear.py) against a naive fp64
reference computed from the same bf16 operands.

What bf16 changes there: the logits are the weight's dtype (bf16 GEMM output), every statistic
is fp32 from them, the gradients come back in bf16. So the reference takes the bf16 logits as
exact values and does everything else in fp64: CE and entropy must agree to fp32 rounding
(1e-5 nats; bf16 logits rounded differently, or statistics in bf16, are off by 1e-2), and the
gradients to bf16 rounding of their own values (0.8% of the largest element; measured here
within 0.66%; a softmax recomputed in bf16 is off by 1.2-5%). The plain path's input gradient,
rounded where the kernel rounds (the fp32 gradient of the logits to bf16, then the GEMM), must
match element by element to one bf16 step. Where two paths do the same arithmetic (a wrong
guess falls back to the full recompute; in-place or not), they must agree bit for bit.
"""

import pytest
import torch
from test_fused_linear import HIDDEN, VOCAB, _masked

from megatron_rmt.entropy import vocab_parallel_ce_entropy
from megatron_rmt.fused_linear import linear_ce_entropy

BF16 = torch.bfloat16
T = 0.7
NATS = 1e-5  # CE and entropy: fp32 statistics of the same logits
GRAD = 8e-3  # gradients, relative to the largest element: bf16's own rounding
ULP = 2**-7  # one bf16 step, relative: where the reference rounds where the kernel does


def _reference(logits, labels, upstream, temperature):
    """fp64 CE, entropy and d sum(upstream * CE) / d logits, the bf16 logits taken as exact."""
    z = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(z / temperature, dim=-1)
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    (loss * upstream.double()).sum().backward()
    return loss.detach(), entropy.detach(), z.grad


def _close_to_reference(name, got, want, rel):
    assert got.dtype == BF16, (name, got.dtype)
    error = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert error < rel, f"{name}: off by {error:.2e} of its largest element (allowed {rel:.0e})"


def _inputs_bf16(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(7, 3, HIDDEN * 2, generator=g).transpose(0, 1).to(BF16)  # [b, s, h]
    weight = (torch.randn(VOCAB, HIDDEN * 2, generator=g) / 2).to(BF16)
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    upstream = torch.rand(3, 7, generator=g)
    return hidden, weight, labels, upstream


def _fused_linear(hidden, weight, labels, upstream, chunk, expected):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, entropy = linear_ce_entropy(
        hidden, weight, labels, temperature=T, chunk_tokens=chunk, expected_grad=expected
    )
    (loss * upstream).sum().backward()
    return loss.detach(), entropy, hidden.grad, weight.grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_linear_bf16_matches_fp64(seed, chunk):
    hidden, weight, labels, upstream = _inputs_bf16(seed)
    mask, ntp = _masked(upstream)  # the NTP loss's gradient: 0.3 x mask, two positions chosen
    # The reference's chain rule through the bf16 logits: d/dh = g @ W, d/dW = g^T @ h (fp64).
    logits = (hidden.double() @ weight.double().t()).to(BF16)  # the GEMM's output, rounded once
    h, w = hidden.double(), weight.double()
    runs = {}
    for guess, grad_out, expected in [
        ("none", upstream, None),
        ("wrong", upstream, torch.rand(3, 7, generator=torch.Generator().manual_seed(9))),
        ("mask, exact", 0.3 * mask, mask),  # no correction: the forward's gradients, scaled
        ("mask, two chosen", ntp, mask),  # two rows corrected in the backward
    ]:
        loss, entropy, g_hidden, g_weight = _fused_linear(
            hidden, weight, labels, grad_out, chunk, expected
        )
        ref_loss, ref_entropy, g = _reference(logits, labels, grad_out, T)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=NATS)
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=NATS)
        assert loss.dtype == entropy.dtype == torch.float32
        _close_to_reference(f"{guess}: grad hidden", g_hidden, g @ w, GRAD)
        _close_to_reference(
            f"{guess}: grad weight", g_weight, g.flatten(0, 1).t() @ h.flatten(0, 1), GRAD
        )
        runs[guess] = (loss, entropy, g_hidden, g_weight)
    # The full recompute: g rounded to bf16, then g @ W rounded once (fp32 accumulation inside).
    _, _, g = _reference(logits, labels, upstream, T)
    rounded = (g.to(BF16).double() @ w).to(BF16)
    torch.testing.assert_close(runs["none"][2], rounded, rtol=ULP, atol=0)
    for a, b in zip(runs["wrong"], runs["none"], strict=True):  # the same full recompute
        assert torch.equal(a, b)


def test_fused_linear_takes_fp32_hidden_states_of_bf16_values():
    """A Float16Module hands the last stage's output over in fp32: the same result as bf16."""
    hidden, weight, labels, upstream = _inputs_bf16(2)
    as_bf16 = _fused_linear(hidden, weight, labels, upstream, 5, None)
    loss, entropy = linear_ce_entropy(hidden.float(), weight, labels, temperature=T, chunk_tokens=5)
    assert torch.equal(loss, as_bf16[0]) and torch.equal(entropy, as_bf16[1])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_ce_entropy_of_bf16_logits_matches_fp64(seed, chunk):
    g = torch.Generator().manual_seed(seed + 10)
    logits = (3 * torch.randn(7, 3, VOCAB, generator=g)).to(BF16).transpose(0, 1)  # [b, s, v]
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    upstream = torch.rand(3, 7, generator=g)
    ref_loss, ref_entropy, ref_grad = _reference(logits, labels, upstream, T)
    out = {}
    for inplace in (False, True):
        x = logits.detach().clone().requires_grad_()
        given = x * 1 if inplace else x  # in place: logits nothing else reads
        loss, entropy = vocab_parallel_ce_entropy(
            given, labels, temperature=T, chunk_tokens=chunk, inplace_backward=inplace
        )
        (loss * upstream).sum().backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=NATS)
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=NATS)
        _close_to_reference(f"inplace={inplace}: grad logits", x.grad, ref_grad, GRAD)
        out[inplace] = (loss, entropy, x.grad)
    for a, b in zip(out[True], out[False], strict=True):  # the same arithmetic
        assert torch.equal(a, b)
