"""GPU-only checks (skipped, saying so, on CPU machines): the compatibility layer stays off, the
fused CE + entropy matches the naive fp32 softmax on CUDA in bf16, and one training step of the
tiny model runs on the GPU with the layer spec chosen there (Transformer Engine when installed)."""

import pytest
import torch

from megatron_rmt import platform
from megatron_rmt.entropy import vocab_parallel_ce_entropy

pytestmark = pytest.mark.gpu


def test_compat_layer_is_off_on_cuda():
    assert not platform.is_active()
    assert platform.device().type == "cuda"


def test_fused_entropy_matches_naive_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 32000, device="cuda", generator=g) * 3).bfloat16()
    labels = torch.randint(0, 32000, (512,), device="cuda", generator=g)
    x = logits.clone().requires_grad_()
    loss, entropy = vocab_parallel_ce_entropy(x, labels, chunk_tokens=128)
    loss.sum().backward()
    ref = logits.float().requires_grad_()
    logp = torch.log_softmax(ref, -1)
    ref_loss = -logp.gather(1, labels[:, None]).squeeze(1)
    ref_loss.sum().backward()
    assert torch.allclose(loss, ref_loss, atol=1e-4)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-3)
    assert torch.allclose(x.grad.float(), ref.grad, atol=1e-2)


def one_step_on_gpu():
    from test_parallel_step import _cfg, _train_step

    from megatron_rmt.build import build_trainable
    from megatron_rmt.model.builder import use_transformer_engine

    trainable = build_trainable(_cfg(), 256)
    first, _ = _train_step(trainable)
    second, _ = _train_step(trainable)
    return first, second, use_transformer_engine(_cfg().model)


def test_train_step_on_gpu():
    from distributed import spawn

    first, second, te = spawn(one_step_on_gpu, 1)[0]
    assert second < first
    print(f"layer spec: {'Transformer Engine' if te else 'local'}")
