"""One NTP training step of the tiny model gives the same loss at TP1, TP2, PP2 and TP2xPP2.

All layouts start from the same weights: a TP1PP1 checkpoint resharded on load by
dist_checkpointing. The step goes through Megatron's own schedule, DDP, optimizer and scheduler.
"""

import pytest
import torch
from distributed import spawn
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rmt import checkpoint, platform
from megatron_rmt.build import build_trainable
from megatron_rmt.config import Config, DataConfig, OptimConfig

VOCAB, SEQ, MICRO, GLOBAL = 256, 32, 2, 4


def _cfg(tp=1, pp=1):
    from megatron_rmt.config import ModelConfig, ParallelConfig

    return Config(
        model=ModelConfig(num_layers=4, seq_length=SEQ),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(micro_batch_size=MICRO, global_batch_size=GLOBAL),
        optim=OptimConfig(lr=1e-2),
    )


def _batches():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    return [tokens[i : i + MICRO] for i in range(0, GLOBAL, MICRO)]


def _forward_step(data_iterator, model):
    window = next(data_iterator).to(platform.device())
    tokens, labels = window[:, :-1], window[:, 1:]
    position_ids = torch.arange(SEQ, device=tokens.device).expand_as(tokens)
    per_token = model(tokens, position_ids, None, labels=labels)  # [b, s]

    def loss_func(output):
        return output.sum(), torch.tensor(output.numel()), {"loss": output.sum().detach()}

    return per_token, loss_func


def _train_step(trainable):
    model = trainable.model
    for m in model:
        m.zero_grad_buffer()
    trainable.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_batches()),
        model=model,
        num_microbatches=GLOBAL // MICRO,
        seq_length=SEQ,
        micro_batch_size=MICRO,
        forward_only=False,
    )
    finalize_model_grads(model, num_tokens=torch.tensor(GLOBAL * SEQ))
    ok, grad_norm, _ = trainable.optimizer.step()
    trainable.scheduler.step(1)
    total = sum(r["loss"].item() for r in reports) / (GLOBAL * SEQ) if reports else None
    return total, grad_norm


def save_initial(path):
    trainable = build_trainable(_cfg(), VOCAB)
    checkpoint.save(path, trainable, checkpoint.Progress(), _cfg())


def step_twice(path, tp, pp):
    trainable = build_trainable(_cfg(tp, pp), VOCAB)
    checkpoint.load(path, trainable)
    first, norm = _train_step(trainable)
    second, _ = _train_step(trainable)
    return first, second, norm


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    spawn(save_initial, 1, args=(path,))
    return path


@pytest.fixture(scope="module")
def reference(initial_checkpoint):
    return spawn(step_twice, 1, args=(initial_checkpoint, 1, 1))[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_same_losses_as_tp1pp1(initial_checkpoint, reference, tp, pp):
    results = spawn(step_twice, tp * pp, tp=tp, pp=pp, args=(initial_checkpoint, tp, pp))
    ref_first, ref_second, ref_norm = reference
    assert ref_second < ref_first  # the optimizer step happened and helped
    for rank, (first, second, norm) in enumerate(results):  # ranks are TP-innermost, PP-outermost
        assert norm == pytest.approx(ref_norm, rel=1e-4), rank  # reduced over the whole model
        if rank < tp * (pp - 1):  # earlier stages compute no loss
            assert first is None and second is None, rank
            continue
        assert first == pytest.approx(ref_first, rel=1e-5), rank
        assert second == pytest.approx(ref_second, rel=1e-4), rank
