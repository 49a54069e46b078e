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


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 5), (1.3, 1), (1.0, 7)], ids=str)
def test_matches_naive_values_and_grads(temperature, chunk):
    logits, labels = make_inputs((3, 11), 50)  # 33 tokens: chunks 5 and 7 do not divide it
    grad_out = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))

    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(
        x, labels, temperature=temperature, chunk_tokens=chunk
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


def test_bf16_input_is_computed_in_fp32():
    logits, labels = make_inputs((4, 9), 300, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(x, labels, chunk_tokens=8)
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


def test_leaves_input_untouched_and_rejects_bad_arguments():
    logits, labels = make_inputs((2, 3), 10)
    before = logits.clone()
    vocab_parallel_ce_entropy(logits, labels, temperature=0.5, chunk_tokens=2)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        vocab_parallel_ce_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError):
        vocab_parallel_ce_entropy(logits, labels[:, :2])


def _sharded_worker(temperature):
    """Each TP rank takes its vocabulary shard of the same global logits."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    logits, labels = make_inputs((2, 7), 48)  # [b, s, v]; the same on every rank (same seed)
    grad_out = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    v_local = logits.shape[-1] // size
    shard = logits[..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(
        shard, labels, tp_group=group, temperature=temperature, chunk_tokens=4
    )
    loss.backward(grad_out)
    return loss, entropy, shard.grad


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_unsharded(tp):
    temperature = 0.8
    results = spawn(_sharded_worker, tp, tp=tp, args=(temperature,))

    logits, labels = make_inputs((2, 7), 48)
    grad_out = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    x_ref = logits.clone().requires_grad_()
    loss_ref, entropy_ref = naive(x_ref, labels, temperature)
    loss_ref.backward(grad_out)

    for loss, entropy, _ in results:
        torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, entropy_ref.detach(), atol=1e-5, rtol=1e-5)
    grad = torch.cat([g for _, _, g in results], dim=-1)  # shards in rank order
    torch.testing.assert_close(grad, x_ref.grad, atol=1e-6, rtol=1e-5)
