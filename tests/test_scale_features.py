"""The memory and overlap features at small scale: activation recompute (full, selective), RL
row-splitting and the overlapped gradient reduce change no loss or gradient; combinations that
cannot work fail early with one line.

Each spawned run builds the tiny model from the same seed several times in one process group and
compares the variants rank by rank (same TP shard on both sides)."""

import os
import socket
import subprocess

import pytest
import rl_groups
import torch
from conftest import ROOT, missing
from distributed import spawn

from megatron_rmt import config, losses, parallel, step
from megatron_rmt.build import build_trainable
from megatron_rmt.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
)
from megatron_rmt.rl_batch import length_multiple
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.selection import Selector

VOCAB, G = 256, 4


def _cfg(tp=1, model=None, parallel_kw=None, global_batch=2):
    return Config(
        model=ModelConfig(num_layers=2, seq_length=16, **(model or {})),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, **(parallel_kw or {})),
        data=DataConfig(micro_batch_size=1, global_batch_size=global_batch),
        optim=OptimConfig(lr=1e-2),
    )


def _groups(seed=0):
    """Two problems of G responses of different lengths, with old log-probs and advantages."""
    g = torch.Generator().manual_seed(seed)
    requests, results = [], []
    for prompt_len in (5, 3):
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=g).tolist()
        lengths = torch.randint(1, 9, (G,), generator=g).tolist()
        responses = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
        logprobs = [(-torch.rand(n, generator=g)).tolist() for n in lengths]
        requests.append(RolloutRequest(prompt, G, 8, 1.0, 1.0, 0))
        results.append(RolloutResult(responses, logprobs, 0))
    adv = torch.randn(2, G, generator=g)
    return requests, results, adv


def _fresh(cfg):
    parallel.seed_everything(cfg.parallel.seed, parallel.layout_of_this_rank())
    return build_trainable(cfg, VOCAB)


def _rl_grads(cfg, rows, aggregation="token"):
    """Loss and gradient (this rank's shard, flattened) of one RL pass over `_groups`."""
    trainable = _fresh(cfg)
    microbatches = rl_groups.rows(
        *_groups(), pad_id=0, rows=rows, length_multiple=length_multiple(cfg)
    )
    count = sum(float(losses.rl_count(m.resp_mask, aggregation)) for m in microbatches)
    trainable.zero_grads()
    settings = rl_groups.settings(aggregation=aggregation, clip_eps=0.2)
    out = step.rl_pass(trainable, microbatches, count, settings)
    grads = torch.cat([p.main_grad.flatten() for p in trainable.model[0].module.parameters()])
    return out.loss_sum, grads


def compare_variants(tp, variants):
    """[(loss, grads)] of each (model overrides, rows, aggregation) variant, on this rank."""
    return [_rl_grads(_cfg(tp, model), rows, agg) for model, rows, agg in variants]


RECOMPUTE = [
    ({}, None, "token"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
     None, "token"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
     None, "token"),
    ({"recompute_granularity": "selective"}, None, "token"),
]  # fmt: skip

ROWS = [
    ({}, None, "token"),
    ({}, 1, "token"),
    ({}, 3, "token"),
    ({}, None, "sequence"),
    ({}, 3, "sequence"),
]


def _assert_same(results, pairs):
    for rank in results:
        for a, b in pairs:
            (loss_a, grad_a), (loss_b, grad_b) = rank[a], rank[b]
            assert abs(loss_a - loss_b) < 1e-5 * max(1.0, abs(loss_a))
            assert grad_a.abs().sum() > 0
            torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_keeps_loss_and_gradients(tp):
    results = spawn(compare_variants, tp, tp=tp, args=(tp, RECOMPUTE))
    _assert_same(results, [(0, 1), (0, 2), (0, 3)])


def test_rl_row_split_equals_whole_group():
    results = spawn(compare_variants, 2, tp=2, args=(2, ROWS))
    _assert_same(results, [(0, 1), (0, 2), (3, 4)])


def test_row_split_pads_each_microbatch_to_its_own_length():
    requests, results, adv = _groups()
    whole = rl_groups.rows(requests, results, adv, pad_id=0)
    split = rl_groups.rows(requests, results, adv, pad_id=0, rows=3, length_multiple=4)
    assert [m.tokens.shape[0] for m in split] == [3, 1, 3, 1]
    assert len({m.tokens.shape[1] for m in whole}) == 1
    for m in split:
        assert m.tokens.shape[1] % 4 == 0
        last = m.resp_mask.nonzero()[:, 1].max()  # the longest row ends in the last 4
        assert m.tokens.shape[1] - 4 <= last < m.tokens.shape[1]
    assert sum(m.resp_mask.sum() for m in split) == sum(m.resp_mask.sum() for m in whole)
    assert sorted(torch.cat([m.advantages for m in split]).tolist()) == sorted(
        adv.flatten().tolist()
    )


def _ntp_batch(seed):
    g = torch.Generator().manual_seed(100 + seed)
    window = torch.randint(0, VOCAB, (1, 17), generator=g)
    tokens = window[:, :-1]
    return {
        "tokens": tokens,
        "labels": window[:, 1:],
        "loss_mask": torch.ones(1, 16),
        "position_ids": torch.arange(16).expand(1, 16),
        "context_len": torch.arange(1, 17).expand(1, 16),
        "sample_ids": torch.tensor([seed]),
    }


def steps_with_overlap(overlap):
    """Three optimizer steps of NTP + RL passes (the second step without RL rows) over DP 2;
    returns this rank's parameters after them."""
    cfg = _cfg(1, parallel_kw={"overlap_grad_reduce": overlap})
    trainable = _fresh(cfg)
    rank = parallel.layout_of_this_rank().dp_rank
    selector = Selector(None, (1.0, 0.0, 0.0), 1, (0.5, 1.0, 1.5), 0, 1, 0)
    for t in range(3):
        trainable.zero_grads()
        batches = [_ntp_batch(2 * t + rank)]
        step.ntp_pass(trainable, batches, selector, 0.1, 64)
        groups = [] if t == 1 else rl_groups.rows(*_groups(t + 10 * rank), pad_id=0)
        step.rl_pass(trainable, groups, 40.0, rl_groups.settings())
        trainable.optimizer_step()
    return torch.cat([p.detach().flatten() for p in trainable.model[0].module.parameters()])


def both_overlaps():
    return steps_with_overlap(False), steps_with_overlap(True)


def test_overlapped_grad_reduce_gives_the_same_step():
    for plain, overlapped in spawn(both_overlaps, 2):
        torch.testing.assert_close(overlapped, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recompute-granularity", "full"], "needs recompute_method"),
        (["--recompute-method", "uniform"], "apply only to recompute_granularity full"),
        (["--recompute-granularity", "full", "--recompute-method", "block",
          "--recompute-num-layers", "3"], "exceeds the 2 layers"),
        (["--sequence-parallel"], "sequence_parallel needs tensor_model_parallel_size > 1"),
        (["--overlap-param-gather", "--no-use-distributed-optimizer"], "distributed optimizer"),
        (["--rl-micro-batch-rows", "0"], "rl_micro_batch_rows must be at least 1"),
        (["--keep-last-n-checkpoints", "0"], "keep_last_n_checkpoints must be at least 1"),
        (["--coldstart-max-steps", "0"], "coldstart_max_steps must be at least 1"),
        (["--rollout-temperature", "-1"], "rollout_temperature -1.0: must be > 0"),
        (["--rollout-temperature", "0"], "greedy decoding, needs a vLLM server"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "4",
          "--sequence-parallel", "--seq-length", "15"], "seq_length 15 divisible by TP 2"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "4",
          "--sequence-parallel", "--rl-layout", "shared_prefix"],
         "rl_layout shared_prefix needs sequence_parallel off"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "4",
          "--sequence-parallel", "--fused-linear-chunk-tokens", "256"],
         "fused_linear_chunk_tokens needs sequence_parallel off"),
    ],
)  # fmt: skip
def test_impossible_combinations_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(["--num-layers", "2", *flags], world_size=2)


@pytest.mark.parametrize(
    "feature", ["sequence_parallel", "apply_rope_fusion", "gradient_accumulation_fusion"]
)
def test_gpu_only_features_fail_at_build_on_cpu(feature):
    from megatron_rmt.model.builder import check_features

    check_features(ModelConfig())  # nothing asked: fine
    with pytest.raises(ConfigError, match=f"model.{feature} needs Transformer Engine"):
        check_features(ModelConfig(**{feature: True}))


def test_persist_layer_norm_is_off_for_the_local_spec(monkeypatch):
    """Megatron's torch norm (the local spec's RMSNorm) rejects persist_layer_norm: a GPU host
    without Transformer Engine must still build."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_rmt import platform
    from megatron_rmt.model import builder

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    tconf = builder.transformer_config(ModelConfig(transformer_impl="local"), 1, 1)
    assert not tconf.persist_layer_norm
    WrappedTorchNorm(tconf, tconf.hidden_size)


@pytest.mark.gpu
def test_bf16_tp2_step_with_recompute_and_sequence_parallel():
    """GPU: bf16, TP 2 over NCCL, Transformer Engine spec, full recompute and sequence
    parallelism give the loss and gradients of the plain run (bf16 tolerance)."""
    if torch.cuda.device_count() < 2:
        missing("a second GPU", "run on a machine with 2 GPUs", ci_has_it=False)
    base = {"bf16": True}
    variants = [
        (base, None, "token"),
        ({**base, "sequence_parallel": True, "recompute_granularity": "full",
          "recompute_method": "uniform", "recompute_num_layers": 1}, 3, "token"),
    ]  # fmt: skip
    for rank in spawn(compare_variants, 2, tp=2, args=(2, variants)):
        (loss_a, grad_a), (loss_b, grad_b) = rank
        assert abs(loss_a - loss_b) < 2e-2 * max(1.0, abs(loss_a))
        torch.testing.assert_close(grad_b.float(), grad_a.float(), rtol=5e-2, atol=1e-3)


def test_prune_keeps_the_newest_and_never_the_latest_or_one_being_written(tmp_path):
    from megatron_rmt import checkpoint

    for step_done in (10, 20, 30, 40):
        os.makedirs(checkpoint.iteration_dir(str(tmp_path), step_done))
    os.makedirs(checkpoint.iteration_dir(str(tmp_path), 50) + ".tmp")  # a save in progress
    checkpoint._write_tracker(str(tmp_path), 20)  # e.g. a resumed run that went back to 20
    deleted = checkpoint.prune(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [checkpoint.TRACKER, "iter_0000020", "iter_0000030", "iter_0000040", "iter_0000050.tmp"]
    )
    assert [os.path.basename(d) for d in deleted] == ["iter_0000010"]


def test_server_bound_to_all_interfaces_prints_a_url_other_nodes_reach():
    from megatron_rmt.rollout.serve import advertised_url

    assert advertised_url("0.0.0.0", "http://127.0.0.1:8011") == f"http://{socket.getfqdn()}:8011"
    assert advertised_url("node7", "http://127.0.0.1:8011") == "http://node7:8011"


def _run_14b_script(tmp_path, data, **env):
    script = os.path.join(ROOT, "examples/rmt_qwen3_14b.sh")
    full = {**os.environ, "MASTER_ADDR": "127.0.0.1", "CKPT_IN": str(tmp_path), "TOKENIZER": "x",
            "DATA": data, **env}  # fmt: skip
    full.pop("ROLLOUT_URLS", None)
    return subprocess.run(["bash", script], env=full, capture_output=True, text=True, timeout=60)


def test_14b_script_needs_rollout_servers_and_finds_the_text_document_prefix(tmp_path):
    (tmp_path / "corpus_text_document.idx").write_bytes(b"")
    (tmp_path / "corpus_text_document.bin").write_bytes(b"")
    missing = _run_14b_script(tmp_path, str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no indexed data" in missing.stderr
    no_servers = _run_14b_script(tmp_path, str(tmp_path / "corpus"))  # suffix left out
    assert no_servers.returncode == 1 and "set ROLLOUT_URLS" in no_servers.stderr


class _ExtraState(torch.nn.Module):
    """Stands in for a Transformer Engine module's FP8 metadata (`_extra_state`)."""

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.loaded = state


def load_local_into_extra_state_model(root):
    from megatron_rmt import checkpoint
    from megatron_rmt.model.builder import build_model

    m = ModelConfig()
    saved = build_model(m, VOCAB)
    checkpoint.save_model(root, saved, Config(model=m))
    target = build_model(m, VOCAB, initialize=False)
    target.decoder.layers[0].mlp.linear_fc1.fp8_meta = _ExtraState()  # a key the file lacks
    checkpoint.load_model(root, target)
    return all(
        torch.equal(a, b) for a, b in zip(saved.parameters(), target.parameters(), strict=True)
    )


def test_a_local_spec_checkpoint_loads_into_a_model_with_extra_state(tmp_path):
    """A checkpoint converted with the local spec (CPU) loads into modules that carry
    `_extra_state` it does not hold (Transformer Engine's), weights strictly."""
    assert spawn(load_local_into_extra_state_model, 1, args=(str(tmp_path),)) == [True]
