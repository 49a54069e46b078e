"""Loss terms against direct formulas, and the Megatron normalisation contract end to end.

The contract test plays out the trainer's recipe (per-micro-batch sums, NTP gradients scaled by
1/N_ntp after the NTP pass, RL losses pre-divided by N_rl, a DP sum at the end) over two fake DP
ranks with uneven micro-batches, and compares the gradient with autograd of
L = mean_RL + lambda * mean_NTP computed directly on the whole batch in one process.
"""

import math

import pytest
import torch

from megatron_rmt.losses import (
    aggregate,
    kl_penalty,
    make_ntp_loss_func,
    make_rl_loss_func,
    ntp_loss_sum,
    policy_loss,
    rl_count,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_ntp_loss_sum_masks_padding_and_rl_positions():
    token_loss = torch.arange(1.0, 9.0).view(2, 4)
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rl_mask = torch.tensor([[False, True, False, False], [False, False, False, True]])
    total, count = ntp_loss_sum(token_loss, loss_mask, rl_mask)
    assert total.item() == 1 + 3 + 5 + 6 + 7
    assert count.item() == 5


def test_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last response is empty
    total, count = aggregate(values, mask, "token")
    assert (total.item(), count.item()) == (1 + 2 + 4, 3)
    total, count = aggregate(values, mask, "sequence")
    assert (total.item(), count.item()) == (1.5 + 4.0, 2)
    assert rl_count(mask, "token").item() == 3 and rl_count(mask, "sequence").item() == 2
    with pytest.raises(ValueError):
        aggregate(values, mask, "batch")


def test_policy_loss_reinforce_and_clipped():
    logp = -torch.rand(3, 4, generator=gen(0))
    old = logp.detach() + 0.3 * torch.randn(3, 4, generator=gen(1))
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 4)
    total, _ = policy_loss(logp, None, adv, mask, "token")
    torch.testing.assert_close(total, -(adv[:, None] * logp).sum())

    eps = 0.2
    total, _ = policy_loss(logp, old, adv, mask, "token", clip_eps=eps)
    expected = 0.0
    for i in range(3):
        for t in range(4):
            rho = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            expected -= min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
    torch.testing.assert_close(total, expected)
    with pytest.raises(ValueError):
        policy_loss(logp, None, adv, mask, clip_eps=eps)


def test_clipped_loss_has_no_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])  # first token: ratio e > 1 + eps
    total, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), clip_eps=0.2)
    total.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == -1


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), r - torch.log(r) - 1)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def naive_logp(logits, labels, temperature=1.0):
    return torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]


def test_loss_funcs_return_the_contract_triple():
    w = torch.randn(6, 11, generator=gen(2), requires_grad=True)
    x = torch.randn(2, 5, 6, generator=gen(3))
    labels = torch.randint(0, 11, (2, 5), generator=gen(4))
    loss_mask = torch.ones(2, 5)
    chosen = torch.zeros(2, 5, dtype=torch.bool)
    chosen[0, 2] = True
    seen = {}

    def select(entropy):
        seen["entropy"] = entropy
        return chosen

    loss, count, report = make_ntp_loss_func(labels, loss_mask, select, 0.1)(x @ w)
    ce = -naive_logp(x @ w, labels)
    torch.testing.assert_close(loss, 0.1 * ce[~chosen].sum())
    assert count.item() == 9 and report["ntp_tokens"].item() == 9
    assert report["rl_positions"].item() == 1 and seen["entropy"].shape == (2, 5)

    adv = torch.tensor([1.0, -1.0])
    old = naive_logp(x @ w, labels, 0.7).detach() + 0.01
    func = make_rl_loss_func(labels, old, adv, loss_mask, 40, temperature=0.7)
    loss, count, report = func(x @ w)
    logp = naive_logp(x @ w, labels, 0.7)
    torch.testing.assert_close(loss, -(adv[:, None] * logp).sum() / 40)
    assert count.item() == 10 and report["rl_tokens"].item() == 10
    assert report["logp_gap_sum"].item() == pytest.approx(0.1, rel=1e-4)

    ref = logp.detach() - 0.2
    func = make_rl_loss_func(labels, None, adv, loss_mask, 40, ref_logp=ref, kl_beta=0.5)
    loss, _, report = func(x @ w)
    kl = kl_penalty(naive_logp(x @ w, labels), ref).sum()
    torch.testing.assert_close(report["kl_sum"], kl)
    torch.testing.assert_close(
        loss, (-(adv[:, None] * naive_logp(x @ w, labels)).sum() + 0.5 * kl) / 40
    )
    with pytest.raises(ValueError):
        make_rl_loss_func(labels, None, adv, loss_mask, 40, kl_beta=0.5)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_megatron_contract_normalises_each_term_by_its_global_count(aggregation):
    hidden, vocab, lam = 8, 13, 0.1
    w = torch.randn(hidden, vocab, generator=gen(0), requires_grad=True)

    def ntp_batch(seed, b, s):
        g = gen(seed)
        x = torch.randn(b, s, hidden, generator=g)
        labels = torch.randint(0, vocab, (b, s), generator=g)
        loss_mask = (torch.rand(b, s, generator=g) > 0.2).float()
        rl_mask = torch.rand(b, s, generator=g) > 0.8
        return x, labels, loss_mask, rl_mask

    def rl_batch(seed, n, length):
        g = gen(seed)
        x = torch.randn(n, length, hidden, generator=g)
        labels = torch.randint(0, vocab, (n, length), generator=g)
        resp = torch.zeros(n, length)
        for i in range(n):  # responses of different lengths after a prompt
            resp[i, 2 : 2 + int(torch.randint(1, length - 2, (1,), generator=g))] = 1
        adv = torch.randn(n, generator=g)
        return x, labels, resp, adv

    # Two DP ranks, each with micro-batches of different sizes.
    ntp = [[ntp_batch(1, 2, 6), ntp_batch(2, 1, 9)], [ntp_batch(3, 3, 4)]]
    rl = [[rl_batch(4, 2, 7)], [rl_batch(5, 3, 6), rl_batch(6, 1, 8)]]

    # The trainer's recipe.
    grads = []
    n_ntp = 0
    for rank_batches in ntp:  # NTP pass: each rank backpropagates lambda * sum
        g = torch.zeros_like(w)
        for x, labels, loss_mask, rl_mask in rank_batches:
            loss, count, _ = make_ntp_loss_func(labels, loss_mask, lambda h, m=rl_mask: m, lam)(
                x @ w
            )
            g += torch.autograd.grad(loss, w)[0]
            n_ntp += count.item()  # the DP all-reduce of the NTP count
        grads.append(g)
    grads = [g / n_ntp for g in grads]  # scale_gradients(1 / N_ntp)
    n_rl = sum(rl_count(resp, aggregation).item() for batches in rl for _, _, resp, _ in batches)
    for rank, rank_batches in enumerate(rl):  # RL pass, already divided by N_rl
        for x, labels, resp, adv in rank_batches:
            func = make_rl_loss_func(labels, None, adv, resp, n_rl, aggregation=aggregation)
            loss, _, _ = func(x @ w)
            grads[rank] = grads[rank] + torch.autograd.grad(loss, w)[0]
    trainer_grad = grads[0] + grads[1]  # finalize_model_grads: sum over DP

    # Direct: L = L_RL + lambda * L_NTP over the whole batch at once.
    ce, keep = [], []
    for x, labels, loss_mask, rl_mask in (b for batches in ntp for b in batches):
        ce.append(-naive_logp(x @ w, labels).flatten())
        keep.append(((loss_mask > 0) & ~rl_mask).flatten())
    ce, keep = torch.cat(ce), torch.cat(keep)
    l_ntp = ce[keep].mean()
    per_response = []  # (sum of -A logp, token count) per response
    for x, labels, resp, adv in (b for batches in rl for b in batches):
        logp = naive_logp(x @ w, labels)
        for i in range(len(adv)):
            m = resp[i] > 0
            per_response.append(((-adv[i] * logp[i][m]).sum(), m.sum()))
    if aggregation == "token":
        l_rl = sum(s for s, _ in per_response) / sum(n for _, n in per_response)
    else:
        l_rl = sum(s / n for s, n in per_response) / len(per_response)
    direct_grad = torch.autograd.grad(l_rl + lam * l_ntp, w)[0]

    torch.testing.assert_close(trainer_grad, direct_grad, atol=1e-6, rtol=1e-5)


def naive_tis_loss(logp, sampler, adv, mask, cap, clip_eps, aggregation):
    """Truncated importance sampling token by token in float64: (loss, d loss / d logp, mean
    ratio, tokens capped). logp_old is logp's own value (the RL pass runs at the step's starting
    weights), so PPO's ratio against it is 1 and only the weight w scales each token."""
    n, length = logp.shape
    loss, grad, ratios, capped = 0.0, torch.zeros(n, length, dtype=torch.float64), [], 0
    for i in range(n):
        tokens = [t for t in range(length) if mask[i, t] > 0]
        for t in tokens:
            ratio = math.exp(float(logp[i, t]) - float(sampler[i, t]))
            w = min(ratio, cap)
            ratios.append(ratio)
            capped += ratio > cap
            a = float(adv[i])
            term = -w * a if clip_eps is not None else -w * a * float(logp[i, t])
            scale = 1.0 if aggregation == "token" else 1.0 / len(tokens)
            loss += scale * term
            grad[i, t] = scale * -w * a  # w is a constant: no gradient through it
    return loss, grad, sum(ratios) / len(ratios), capped


@pytest.mark.parametrize("clip_eps", [None, 0.2], ids=["no_clip", "clip"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_truncated_importance_sampling_matches_a_naive_loop(clip_eps, aggregation):
    g = gen(7)
    logp = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # Sampler log-probs up to 1.5 nats away on either side: some ratios far above the cap.
    sampler = logp.detach() + 1.5 * (2 * torch.rand(3, 6, generator=g, dtype=torch.float64) - 1)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0  # a shorter response
    mask[2, :2] = 0
    sampler[1, 4:] = 0.0  # placeholders off the responses, as rl_batch lays them out
    adv = torch.tensor([1.0, -0.7, 2.0], dtype=torch.float64)
    cap = 1.5
    total, count = policy_loss(logp, sampler, adv, mask, aggregation, clip_eps, tis_cap=cap)
    (grad,) = torch.autograd.grad(total, logp)
    expected, expected_grad, mean_ratio, capped = naive_tis_loss(
        logp.detach(), sampler, adv, mask, cap, clip_eps, aggregation
    )
    assert 0 < capped < int(mask.sum())  # both kinds of tokens are in the test
    assert total.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert count.item() == rl_count(mask, aggregation).item()

    # With the clip, the surrogate's ratio is against the trainer's own log-probs: the gradient
    # is exactly the unclipped one; without TIS the clipped loss is a different one.
    if clip_eps is not None:
        plain, _ = policy_loss(logp, sampler, adv, mask, aggregation, None, tis_cap=cap)
        assert torch.equal(torch.autograd.grad(plain, logp)[0], grad)
        ppo, _ = policy_loss(logp, sampler, adv, mask, aggregation, clip_eps)
        assert not torch.allclose(torch.autograd.grad(ppo, logp)[0], grad)

    # The loss_func's report: the mean untruncated ratio and the capped tokens.
    hidden = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (3, 6), generator=g)
    trainer = naive_logp(hidden @ w, labels).detach()
    sampler = trainer + 1.5 * (2 * torch.rand(3, 6, generator=g, dtype=torch.float64) - 1)
    func = make_rl_loss_func(labels, sampler, adv, mask, 10, tis_cap=cap, clip_eps=clip_eps,
                             aggregation=aggregation)  # fmt: skip
    loss, _, report = func(hidden @ w)
    expected, _, mean_ratio, capped = naive_tis_loss(
        trainer, sampler, adv, mask, cap, clip_eps, aggregation
    )
    # The CE kernel computes the log-probs in float32: equal to its rounding.
    assert loss.item() == pytest.approx(expected / 10, rel=1e-5)
    assert report["tis_ratio_sum"].item() / mask.sum().item() == pytest.approx(mean_ratio, rel=1e-5)
    assert report["tis_capped"].item() == capped


def test_truncated_importance_sampling_off_and_at_equal_log_probs():
    logp = -torch.rand(2, 4, generator=gen(8)).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    off, _ = policy_loss(logp, None, adv, mask)
    same, _ = policy_loss(logp, logp.detach(), adv, mask, tis_cap=2.0)  # sampler == trainer: w 1
    assert torch.equal(off, same)
    with pytest.raises(ValueError):
        policy_loss(logp, None, adv, mask, tis_cap=2.0)
