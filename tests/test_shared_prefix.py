"""Shared-prefix RL groups give the row-per-response layout's log-probs, loss, KL and gradients."""

from contextlib import contextmanager

import pytest
import rl_groups
import torch
from distributed import spawn
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.transformer.enums import AttnMaskType

from megatron_rmt import step
from megatron_rmt.build import build_trainable
from megatron_rmt.config import Config, ModelConfig
from megatron_rmt.model import shared_prefix
from megatron_rmt.model.shared_prefix import block_mask
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult

VOCAB = 256


def _groups(seed: int = 0):
    """Two groups of G = 3 with different prompt and response lengths (one of a single token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    requests, results = [], []
    for prompt, lengths in ((7, (4, 1, 6)), (11, (3, 5, 2))):
        requests.append(RolloutRequest(ids(prompt), 3, 8, 1.0, 1.0, 0))
        responses = [ids(n) for n in lengths]
        logps = [(-torch.rand(n, generator=g)).tolist() for n in lengths]
        results.append(RolloutResult(responses, logps, 0))
    adv = torch.tensor([[1.0, -0.5, -0.5], [0.3, 0.7, -1.0]])
    return requests, results, adv


def test_block_mask_matches_a_naive_loop():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3, -1, -1]])
    got = block_mask(segments)[0, 0]
    s = segments.shape[1]
    for i in range(s):
        for j in range(s):
            si, sj = int(segments[0, i]), int(segments[0, j])
            allowed = j <= i and (sj == 0 or sj == si)
            assert bool(got[i, j]) == (not allowed), (i, j)


def test_each_label_sees_exactly_its_own_row():
    """What the position predicting response k's token t attends to (tokens and RoPE positions)
    is that row's prompt + response[:t], and its label is response[t]."""
    requests, results, adv = _groups()
    for req, res, mb in zip(
        requests, results, rl_groups.shared(requests, results, adv, pad_id=0), strict=True
    ):
        visible = ~block_mask(mb.segments)[0, 0]  # [S, S]
        width = mb.labels.shape[1]
        for k, resp in enumerate(res.responses):
            for t, token in enumerate(resp):
                row = int(mb.rows[0, k * width + t])
                seen = visible[row].nonzero().flatten()
                assert mb.tokens[0, seen].tolist() == req.prompt_ids + resp[:t]
                assert mb.position_ids[0, seen].tolist() == list(range(len(seen)))
                assert int(mb.labels[k, t]) == token
                assert float(mb.old_logp[k, t]) == pytest.approx(res.logprobs[k][t])
            assert mb.resp_mask[k].tolist() == [1.0] * len(resp) + [0.0] * (width - len(resp))
    # One shape for the pipeline schedule: prompt + responses without their last tokens.
    mbs = rl_groups.shared(requests, results, adv, pad_id=0)
    assert {tuple(mb.tokens.shape) for mb in mbs} == {(1, 11 + 2 + 4 + 1)}
    # An empty response has no inputs and no labels.
    empty = RolloutResult([[5, 6], []], [[-0.1, -0.2], []], 0)
    (mb,) = rl_groups.shared(requests[:1], [empty], adv[:1, :2], pad_id=0)
    assert mb.tokens.shape == (1, 7 + 1) and mb.resp_mask.tolist() == [[1, 1], [0, 0]]


def _grads(trainable) -> list[torch.Tensor]:
    return [p.main_grad.clone() for p in trainable.model[0].module.parameters()]


@contextmanager
def softmax_as_on_gpu():
    """Megatron's attention softmax as it behaves on GPU: told `causal`, its fused kernel
    (ScaledUpperTriangMaskedSoftmax) applies the upper-triangular mask and never reads the mask
    it is given; the local CPU path applies a given mask whatever the type, so without this an
    attention that never switches to `arbitrary` would pass here and fail on GPU."""
    forward = FusedScaleMaskSoftmax.forward

    def gpu_like(self, input, mask, *args, **kwargs):
        if self.attn_mask_type == AttnMaskType.causal:
            mask = None  # the kernel's own causal mask instead (forward_torch_softmax builds it)
        return forward(self, input, mask, *args, **kwargs)

    FusedScaleMaskSoftmax.forward = gpu_like
    try:
        yield
    finally:
        FusedScaleMaskSoftmax.forward = forward


def both_layouts(kl_estimator: str):
    """Reference log-probs, then a KL-regularised RL pass, in each layout on the same model,
    with the attention softmax of the GPU (`softmax_as_on_gpu`)."""
    with softmax_as_on_gpu():
        return _both_layouts(kl_estimator)


def _both_layouts(kl_estimator: str):
    cfg = Config(model=ModelConfig(num_layers=2, rl_layout="shared_prefix"))
    torch.manual_seed(0)
    trainable = build_trainable(cfg, VOCAB)
    requests, results, adv = _groups()
    out = {}
    for name, build in (("rows", rl_groups.rows), ("shared", rl_groups.shared)):
        groups = build(requests, results, adv, pad_id=0)
        ref = step.reference_logprobs(trainable.model, groups, 0.7, 64)
        # A reference policy that differs from the policy, so the KL term has a gradient.
        shifted = [
            None if r is None else r + 0.1 * torch.sin(g.labels.float())
            for g, r in zip(groups, ref, strict=True)
        ]
        trainable.zero_grads()
        settings = rl_groups.settings(0.7, clip_eps=0.2, kl_beta=0.05, kl_estimator=kl_estimator)
        outcome = step.rl_pass(trainable, groups, 20.0, settings, shifted)
        logps = [r[g.resp_mask > 0] for g, r in zip(groups, ref, strict=True) if r is not None]
        out[name] = (torch.cat(logps) if logps else None, outcome, _grads(trainable))
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_same_logprobs_loss_kl_and_grads_as_rows(tp, pp):
    for out in spawn(both_layouts, tp * pp, tp=tp, pp=pp, args=("k3",)):
        (rows_lp, rows, rows_grads), (lp, shared, grads) = out["rows"], out["shared"]
        if rows_lp is not None:  # the last pipeline stage
            assert lp.shape == rows_lp.shape == (21,)
            torch.testing.assert_close(lp, rows_lp, rtol=1e-5, atol=1e-5)
        assert shared.tokens == rows.tokens == 21
        assert shared.loss_sum == pytest.approx(rows.loss_sum, rel=1e-5, abs=1e-6)
        assert shared.kl_sum == pytest.approx(rows.kl_sum, rel=1e-5, abs=1e-6)
        assert shared.kl_sum > 0
        for a, b in zip(grads, rows_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_training_steps_agree_with_rows(tiny_corpus, tmp_path):
    """`--rl-layout shared_prefix` end to end (step.rl_update): the same metrics as rows."""
    from test_train import _flags, _read, _train

    got = {}
    for layout in ("rows", "shared_prefix"):
        metrics = str(tmp_path / f"{layout}.jsonl")
        extra = ["--rl-layout", layout, "--metrics-file", metrics, "--kl-beta", "0.01"]
        spawn(_train, 1, args=(_flags(tiny_corpus, extra=extra),))
        got[layout] = _read(metrics)
    assert len(got["rows"]) == 2 and got["rows"][1]["kl"] > 0
    for a, b in zip(got["shared_prefix"], got["rows"], strict=True):
        assert a["rl_tokens_trained"] > 0
        for key in ("rl_loss", "kl", "grad_norm", "reward", "ntp_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


class _RecordingTEAttention(torch.nn.Module):
    """Stands in for Transformer Engine's core attention (absent here): records the mask type
    each call is given, which is what selects TE's backend (a causal one ignores the mask)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
        self.calls.append((attention_mask is not None, attn_mask_type))
        return query


def test_te_attention_is_told_arbitrary_whenever_a_mask_is_given(monkeypatch):
    from megatron.core.extensions import transformer_engine

    monkeypatch.setattr(transformer_engine, "TEDotProductAttention", _RecordingTEAttention)
    attention = shared_prefix._te_masked_attention()()
    q = torch.zeros(4, 1, 2, 8)
    mask = block_mask(torch.tensor([[0, 0, 1, 2]]))
    attention(q, q, q, mask, AttnMaskType.causal)
    attention(q, q, q, None, AttnMaskType.causal)  # the NTP pass: the spec's causal, unchanged
    assert attention.calls == [(True, AttnMaskType.arbitrary), (False, AttnMaskType.causal)]
