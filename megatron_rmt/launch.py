"""Setting up a run, shared by every entry point (train, posttrain, coldstart, evaluate):
torch.distributed and Megatron's groups, the data checks, the model's and the servers'
vocabularies, and `setup`, which assembles a `Run` (model, optimizer, checkpoint, data streams,
rollout engine, reference policy).
"""

import json
import os
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rmt import checkpoint, config, parallel, prompts
from megatron_rmt.ahead import RolloutQueue
from megatron_rmt.build import Trainable, build_trainable
from megatron_rmt.data import DataError, MicrobatchIterator, build_train_dataset, parse_data_path
from megatron_rmt.model import padded_vocab_size
from megatron_rmt.reference import build_reference
from megatron_rmt.rollout.contract import RolloutEngine
from megatron_rmt.rollout.embedded import EmbeddedEngine
from megatron_rmt.rollout.engines import build_engine
from megatron_rmt.tokenizer import TextTokenizer, tokenizer_of
from megatron_rmt.variants import VARIANTS


@dataclass
class Run:
    """Everything one rank trains with."""

    cfg: config.Config
    layout: parallel.Layout
    tokenizer: TextTokenizer
    template: prompts.PromptTemplate  # the next-token-reasoning prompt, read once
    trainable: Trainable
    data: MicrobatchIterator | None  # None until the caller supplies its own (post-training)
    engine: RolloutEngine
    progress: checkpoint.Progress
    decay_data: MicrobatchIterator | None = None  # WSD decay-phase blend, if it has one
    decay_from: int | None = None  # the first step that draws from decay_data
    talker: int = 0  # global rank that calls a rollout service for this replica
    reference: list | None = None  # the frozen pi_ref of the KL term (only when kl_beta > 0)
    rollout_queue: RolloutQueue | None = None  # chosen positions until their RL term (ahead.py)


def init_distributed(cfg: config.Config) -> None:
    """torch.distributed and Megatron's TP/PP/DP groups; rank 0 prints the resolved config."""
    p = cfg.parallel
    parallel.init(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.seed,
        p.distributed_timeout_minutes,
    )
    if dist.get_rank() == 0:
        print("resolved config:\n" + config.to_yaml(cfg), flush=True)


def setup(cfg: config.Config, engine: RolloutEngine | None = None) -> Run:
    """Model, optimizer, checkpoint, data streams (when --data-path is set), rollout engine."""
    d = cfg.data
    check_data(cfg)
    tokenizer = tokenizer_of(d)
    vocab = model_vocab(cfg, tokenizer)
    trainable = build_trainable(cfg, vocab)
    progress = checkpoint.Progress()
    if cfg.checkpoint.load:
        progress = checkpoint.load(
            cfg.checkpoint.load, trainable, load_optimizer=not cfg.checkpoint.no_load_optim
        )
    layout = parallel.layout_of_this_rank()
    data = None
    if d.data_path:
        data = _stream(cfg, tokenizer, layout, d.data_path, progress.consumed_samples)
    decay_data = None
    decay_from = decay_start(cfg)
    if decay_from is not None:  # Stable-then-Decay: the decay phase draws from its own blend
        done = max(progress.step - decay_from, 0) * d.global_batch_size
        decay_data = _stream(cfg, tokenizer, layout, d.decay_data_path, done)
    samples = VARIANTS[cfg.rmt.rmt_variant].rl  # NTP only: no server to build, no weights to sync
    if engine is None and cfg.rollout.rollout_url and samples:
        engine = build_engine(cfg, trainable, tokenizer, served_vocab(cfg, tokenizer))
    engine = engine or EmbeddedEngine(trainable.model, tokenizer.vocab_size, tokenizer.eod)
    engine.sync_weights(progress.step)
    template = prompts.load_template(cfg.rmt.prompt_template)
    reference = None
    if cfg.rmt.kl_beta > 0:
        reference = build_reference(
            cfg.model, vocab, trainable, cfg.checkpoint.ref_load, progress.step
        )
    talker = parallel.replica_talker()
    queue = RolloutQueue.of(cfg, progress.pending_rollouts, layout.dp_rank, layout.dp_size)
    return Run(
        cfg, layout, tokenizer, template, trainable, data, engine, progress, decay_data,
        decay_from, talker, reference, queue,
    )  # fmt: skip


def check_data(cfg: config.Config) -> None:
    """Every shard of --data-path and --decay-data-path, on every rank, before anything is
    built: a missing, empty or truncated file on any node stops every rank here, by name and
    node (data.DataError)."""
    paths = [p for p in (cfg.data.data_path, cfg.data.decay_data_path) if p]
    parallel.agree(lambda: [parse_data_path(p) for p in paths], DataError)


def model_vocab(cfg: config.Config, tokenizer) -> int:
    """The model's vocabulary: --vocab-size, or the tokenizer's padded as Megatron pads it."""
    return cfg.model.vocab_size or padded_vocab_size(
        tokenizer.vocab_size,
        cfg.model.make_vocab_size_divisible_by,
        cfg.parallel.tensor_model_parallel_size,
    )


def served_vocab(cfg: config.Config, tokenizer) -> int:
    """The vocabulary the rollout servers' HF model has (its config.json), which the weight sync
    cuts Megatron's padded rows to: the converter keeps that config beside the checkpoint."""
    for folder in (cfg.checkpoint.load, cfg.data.tokenizer_model):
        path = os.path.join(folder or "", "hf_config.json")
        if folder and os.path.isfile(path):
            with open(path) as fh:
                return json.load(fh)["vocab_size"]
    return tokenizer.vocab_size


def decay_start(cfg: config.Config) -> int | None:
    """First step of the WSD decay phase when it has a blend of its own, else None."""
    o = cfg.optim
    if o.lr_decay_style != "WSD" or not cfg.data.decay_data_path:
        return None
    return o.train_iters - o.lr_wsd_decay_iters


def _stream(cfg, tokenizer, layout, data_path, consumed: int) -> MicrobatchIterator:
    d = cfg.data
    dataset = build_train_dataset(
        data_path, d.split, cfg.model.seq_length, cfg.optim.train_iters * d.global_batch_size,
        cfg.parallel.seed, tokenizer, d.data_cache_path,
    )  # fmt: skip
    return MicrobatchIterator(
        dataset, d.micro_batch_size, d.global_batch_size, layout.dp_rank, layout.dp_size, consumed
    )


def data_for_step(run: Run, t: int) -> MicrobatchIterator:
    """The stable-phase stream, or from the decay phase on, the decay blend's."""
    return run.decay_data if run.decay_from is not None and t >= run.decay_from else run.data


def rollout_seed(run: Run, t: int) -> int:
    """Step t's sampling seed, distinct per data-parallel replica (independent samples)."""
    return (run.cfg.parallel.seed + 7919 * t) * run.layout.dp_size + run.layout.dp_rank
