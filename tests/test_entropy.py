"""Fused CE + entropy against a naive full-vocabulary fp32 softmax, unsharded and on gloo TP."""

import pytest
import torch
from distributed import spawn

from megatron_rmt.entropy import vocab_parallel_ce_entropy


def naive(logits, labels, temperature=1.0):
    """Full-vocab fp32 reference: CE of the label and Shannon entropy, differentiable."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [..., v]
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return loss, entropy


def make_inputs(shape, vocab, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spread the logits so the distributions range from peaked to flat.
    logits = torch.randn(*shape, vocab, generator=g) * torch.rand(*shape, 1, generator=g) * 6
    labels = torch.randint(0, vocab, shape, generator=g)
    return logits.to(dtype), labels


@pytest.mark.parametrize("inplace", [False, True], ids=["recompute", "keep-softmax"])
@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 5), (1.3, 1), (1.0, 7)], ids=str)
def test_matches_naive_values_and_grads(temperature, chunk, inplace):
    """fp32 logits: in place, the softmax is kept in the logits during the forward."""
    logits, labels = make_inputs((3, 11), 50)  # 33 tokens: chunks 5 and 7 do not divide it
    grad_out = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))

    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(
        x, labels, temperature=temperature, chunk_tokens=chunk, inplace_backward=inplace
    )
    (grad,) = torch.autograd.grad(loss, x, grad_out)

    x_ref = logits.clone().requires_grad_()
    loss_ref, entropy_ref = naive(x_ref, labels, temperature)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref, grad_out)

    assert loss.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)
    assert not entropy.requires_grad


@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_input_is_computed_in_fp32(inplace):
    logits, labels = make_inputs((4, 9), 300, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(x, labels, chunk_tokens=8, inplace_backward=inplace)
    loss.sum().backward()

    x_ref = logits.clone().requires_grad_()
    loss_ref, entropy_ref = naive(x_ref, labels)
    loss_ref.sum().backward()

    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref.detach(), atol=1e-5, rtol=1e-5)
    # Both gradients are fp32 math rounded once to bf16.
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-2, rtol=1e-2)


def test_inplace_backward_writes_the_gradient_into_the_logits():
    logits, labels = make_inputs((3, 5), 40)
    x_ref = logits.clone().requires_grad_()
    naive(x_ref, labels, 0.9)[0].sum().backward()

    x = logits.clone().requires_grad_()
    loss, _ = vocab_parallel_ce_entropy(
        x, labels, temperature=0.9, chunk_tokens=4, inplace_backward=True
    )
    loss.sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert x.grad.data_ptr() == x.data_ptr()  # no second [N, v] tensor
    with pytest.raises(RuntimeError, match="inplace"):
        loss.sum().backward()  # the saved logits are gone: autograd must refuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_stored_sequence_major_are_not_copied(dtype):
    """A [b, s, v] view of [s, b, v] memory (forward_logits' output): same values and grads,
    and in place the gradient still lands in that memory."""
    logits, labels = make_inputs((3, 6), 40, dtype=dtype)  # [b, s, v]
    grad_out = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    x_ref = logits.clone().requires_grad_()
    loss_ref, entropy_ref = naive(x_ref, labels, 0.8)
    loss_ref.backward(grad_out)

    stored = logits.transpose(0, 1).contiguous().requires_grad_()  # [s, b, v] memory
    view = stored.transpose(0, 1)  # [b, s, v]
    loss, entropy = vocab_parallel_ce_entropy(
        view, labels, temperature=0.8, chunk_tokens=5, inplace_backward=True
    )
    loss.backward(grad_out)
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref.detach(), atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(stored.grad.transpose(0, 1), x_ref.grad, atol=tol, rtol=1e-5)
    assert stored.grad.data_ptr() == stored.data_ptr()


def test_leaves_input_untouched_and_rejects_bad_arguments():
    logits, labels = make_inputs((2, 3), 10)
    before = logits.clone()
    vocab_parallel_ce_entropy(logits, labels, temperature=0.5, chunk_tokens=2)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        vocab_parallel_ce_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError):
        vocab_parallel_ce_entropy(logits, labels[:, :2])


# (dtype, inplace, sequence-major memory): the recompute path, the keep-softmax path (also on
# a [b, s, v] view of [s, b, v] memory) and bf16 in place.
TP_CASES = [
    (torch.float32, False, False),
    (torch.float32, True, False),
    (torch.float32, True, True),
    (torch.bfloat16, True, False),
]


def _sharded_worker(temperature):
    """Each TP rank takes its vocabulary shard of the same global logits, in every TP_CASES way."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    logits, labels = make_inputs((2, 7), 48)  # [b, s, v]; the same on every rank (same seed)
    grad_out = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    v_local = logits.shape[-1] // size
    results = []
    for dtype, inplace, seq_major in TP_CASES:
        # A fresh contiguous copy per case: the in-place cases overwrite it.
        shard = logits[..., rank * v_local : (rank + 1) * v_local].to(dtype).contiguous()
        if seq_major:
            shard = shard.transpose(0, 1).contiguous().transpose(0, 1)
        shard = shard.detach().requires_grad_()
        loss, entropy = vocab_parallel_ce_entropy(
            shard, labels, tp_group=group, temperature=temperature, chunk_tokens=4,
            inplace_backward=inplace,
        )  # fmt: skip
        loss.backward(grad_out)
        results.append((loss, entropy, shard.grad.float()))
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_unsharded(tp):
    temperature = 0.8
    per_rank = spawn(_sharded_worker, tp, tp=tp, args=(temperature,))

    logits, labels = make_inputs((2, 7), 48)
    grad_out = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    for case, (dtype, _, _) in enumerate(TP_CASES):
        x_ref = logits.to(dtype).float().clone().requires_grad_()  # bf16: same rounded inputs
        loss_ref, entropy_ref = naive(x_ref, labels, temperature)
        loss_ref.backward(grad_out)
        for results in per_rank:
            loss, entropy, _ = results[case]
            torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy, entropy_ref.detach(), atol=1e-5, rtol=1e-5)
        grad = torch.cat([results[case][2] for results in per_rank], dim=-1)  # rank order
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(grad, x_ref.grad, atol=tol, rtol=1e-5)
