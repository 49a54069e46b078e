"""forward_logits: same values and gradients as a plain GPTModel call, without the logits copy."""

import torch
from distributed import spawn
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from megatron_rmt.build import build_trainable
from megatron_rmt.config import Config, ModelConfig
from megatron_rmt.entropy import vocab_parallel_ce_entropy
from megatron_rmt.model.builder import layer_spec
from megatron_rmt.model.logits import forward_logits

VOCAB, SEQ, BATCH = 256, 16, 3


def _grads_after(trainable, logits, labels, group):
    """Output-layer and first-layer gradients of the fused CE (in place, as the trainer runs it)."""
    model = trainable.model[0]
    model.zero_grad_buffer()
    loss, _ = vocab_parallel_ce_entropy(logits, labels, tp_group=group, inplace_backward=True)
    loss.sum().backward()
    gpt = model.module
    params = (gpt.output_layer.weight, gpt.decoder.layers[0].mlp.linear_fc1.weight)
    return [p.main_grad.clone() for p in params]


def _worker():
    group = ps.get_tensor_model_parallel_group()
    cfg = Config(model=ModelConfig(num_layers=2, seq_length=SEQ))
    torch.manual_seed(0)
    trainable = build_trainable(cfg, VOCAB)
    model = trainable.model[0]  # DDP-wrapped GPTModel
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    plain = model(tokens, positions, None)  # [b, s, v/tp]
    ours = forward_logits(model, tokens, positions)
    values_equal = ours.shape == plain.shape and torch.equal(ours, plain)
    # No copy: the result is a view of the output layer's [s, b, v/tp] tensor.
    no_copy = ours.transpose(0, 1).is_contiguous() and not ours.is_contiguous()
    plain_grads = _grads_after(trainable, plain, labels, group)
    our_grads = _grads_after(trainable, ours, labels, group)
    grads_equal = all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, our_grads, strict=True)
    )

    # A stage without the output layer (pipeline parallelism) returns its hidden states as is.
    torch.manual_seed(0)
    inner = GPTModel(
        config=model.module.config,
        transformer_layer_spec=layer_spec(cfg.model),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        post_process=False,
    )
    with torch.no_grad():
        hidden_equal = torch.equal(
            forward_logits(inner, tokens, positions), inner(tokens, positions, None)
        )
    return values_equal, no_copy, grads_equal, hidden_equal


def test_same_logits_and_grads_without_copy_tp2():
    for values_equal, no_copy, grads_equal, hidden_equal in spawn(_worker, 2, tp=2):
        assert values_equal
        assert no_copy
        assert grads_equal
        assert hidden_equal
