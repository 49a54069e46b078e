"""Fused output projection + CE + entropy: the logits path's values and gradients, TP1 and TP2."""

import pytest
import torch
from distributed import spawn
from megatron.core import parallel_state as ps

from megatron_rmt import step
from megatron_rmt.build import build_trainable
from megatron_rmt.config import Config, ModelConfig
from megatron_rmt.fused_linear import linear_ce_entropy
from megatron_rmt.selection import Selector

VOCAB, HIDDEN = 96, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(7, 3, HIDDEN, generator=g).transpose(0, 1)  # [3, 7, h] view of [s, b, h]
    weight = torch.randn(VOCAB, HIDDEN, generator=g) / 2
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    upstream = torch.rand(3, 7, generator=g)
    return hidden, weight, labels, upstream


def _naive(hidden, weight, labels, upstream, temperature):
    """Full logits, fp32 log-softmax: CE, entropy, and the gradients of sum(upstream * CE)."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logp = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    (loss * upstream).sum().backward()
    return loss.detach(), entropy.detach(), hidden.grad, weight.grad


def _fused(hidden, weight, labels, upstream, temperature, chunk, tp_group=None, expected=None):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, entropy = linear_ce_entropy(
        hidden, weight, labels, tp_group=tp_group, temperature=temperature, chunk_tokens=chunk,
        expected_grad=expected,
    )  # fmt: skip
    assert not entropy.requires_grad
    (loss * upstream).sum().backward()
    return loss.detach(), entropy, hidden.grad, weight.grad


def _masked(upstream):
    """A loss mask, and the NTP loss's gradient: 0.3 x the mask less two chosen positions."""
    mask = (upstream > 0.2).float()
    actual = 0.3 * mask
    actual[0, 2] = actual[2, 5] = 0.0
    return mask, actual


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("guess", ["none", "mask", "wrong"])
def test_matches_full_logits(chunk, guess):
    """Without a guess, with the NTP loss's own (right but for C), and with a wrong one."""
    hidden, weight, labels, upstream = _inputs()
    mask, actual = _masked(upstream)
    if guess != "none":
        upstream = actual
    expected = {"none": None, "mask": mask, "wrong": torch.rand(3, 7)}[guess]
    want = _naive(hidden, weight, labels, upstream, 0.7)
    got = _fused(hidden, weight, labels, upstream, 0.7, chunk, expected=expected)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def vocab_parallel_worker():
    """Each rank holds half the vocabulary rows; hidden states are replicated."""
    hidden, weight, labels, upstream = _inputs(1)
    rank, shard = ps.get_tensor_model_parallel_rank(), VOCAB // 2
    mine = weight[rank * shard : (rank + 1) * shard]
    mask, upstream = _masked(upstream)  # the NTP loss's gradient, guessed from the mask
    want = _naive(hidden, weight, labels, upstream, 1.0)
    group = ps.get_tensor_model_parallel_group()
    got = _fused(hidden, mine, labels, upstream, 1.0, 4, group, expected=mask)
    loss_ok = torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    entropy_ok = torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    hidden_ok = torch.allclose(got[2], want[2], rtol=1e-5, atol=1e-6)
    weight_ok = torch.allclose(got[3], want[3][rank * shard : (rank + 1) * shard], atol=1e-6)
    return loss_ok, entropy_ok, hidden_ok, weight_ok


def test_vocab_parallel_tp2():
    for oks in spawn(vocab_parallel_worker, 2, tp=2):
        assert all(oks), oks


def ntp_both_ways(tied: bool):
    """The NTP pass through the logits and through the fused projection."""
    model = ModelConfig(num_layers=2, untie_embeddings_and_output_weights=not tied)
    torch.manual_seed(0)
    trainable = build_trainable(Config(model=model), 256)
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 256, (2, 2, 17), generator=g)
    mbs = [
        {
            "tokens": w[:, :-1],
            "labels": w[:, 1:],
            "loss_mask": (torch.rand(2, 16, generator=g) > 0.2).float(),
            "position_ids": torch.arange(16).expand(2, 16),
            "context_len": torch.arange(1, 17).expand(2, 16),
            "sample_ids": torch.tensor([0, 1]),
        }
        for w in windows
    ]
    # One RL position chosen per window: its CE leaves the loss (the kernel's correction).
    sel = Selector("uniform", (1.0, 0.0, 0.0), 1, (0.5, 1.0, 1.5), 0, 1, 0)
    out = []
    for chunk in (0, 5):
        trainable.zero_grads()
        outcome = step.ntp_pass(trainable, mbs, sel, 0.3, 1024, fused_linear_chunk=chunk)
        grads = [p.main_grad.clone() for p in trainable.model[0].module.parameters()]
        assert len(outcome.problems) == 4 or not ps.is_pipeline_last_stage()
        out.append((outcome.ntp_loss_sum, outcome.entropy_sum, outcome.ntp_tokens, grads))
    return out


@pytest.mark.parametrize(
    "tp,pp,tied", [(1, 1, False), (2, 1, True), (1, 2, True)], ids=["tp1", "tp2-tied", "pp2-tied"]
)
def test_ntp_pass_same_as_logits_path(tp, pp, tied):
    for plain, fused in spawn(ntp_both_ways, tp * pp, tp=tp, pp=pp, args=(tied,)):
        assert fused[2] == plain[2] > 0
        assert fused[0] == pytest.approx(plain[0], rel=1e-5)
        assert fused[1] == pytest.approx(plain[1], rel=1e-5)
        for a, b in zip(fused[3], plain[3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
