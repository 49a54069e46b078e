"""Reinforcement Mid-Training on Megatron-Core. Run under torchrun:

    torchrun --nproc-per-node 2 -m megatron_rmt.train --config configs/tiny_cpu.yaml ...

Each step t of T, on streamed pretraining windows:
  1. NTP pass over the step's microbatches: fused CE + entropy per position on the last stage;
     candidates bucketed by entropy; the curriculum p(t) picks C; NTP loss on every other token.
  2. The prefixes at C become "think, then predict the next token" prompts under budget B_t;
     the rollout engine samples G responses each.
  3. Rewards (token match, length vs B_t) -> group-normalised advantages (GRPO).
  4. RL pass over prompt+response groups; its gradient joins the NTP gradient in the same buffers.
  5. One optimizer step, the LR schedule, weight sync to the rollout engine, metrics, checkpoint.
The variants (ablations, RPT, plain NTP) switch parts of this off; see variants.py.
"""

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rmt import budget as budget_mod
from megatron_rmt import (
    checkpoint,
    config,
    dryrun,
    grpo,
    losses,
    parallel,
    problems,
    prompts,
    selection,
    step,
)
from megatron_rmt.async_save import AsyncSaves
from megatron_rmt.build import Trainable, build_trainable
from megatron_rmt.data import DataError, MicrobatchIterator, build_train_dataset, parse_data_path
from megatron_rmt.metrics import MetricsWriter, step_metrics, train_flops_per_token
from megatron_rmt.model import padded_vocab_size
from megatron_rmt.reference import build_reference
from megatron_rmt.rollout.client import build_engine
from megatron_rmt.rollout.contract import RolloutEngine
from megatron_rmt.rollout.dispatch import MakeRequests, StepRollouts, served
from megatron_rmt.rollout.embedded import EmbeddedEngine
from megatron_rmt.save_lock import save_lock
from megatron_rmt.tokenizer import TextTokenizer, tokenizer_of
from megatron_rmt.variants import VARIANTS, ntp_weight


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
    talker: int = 0  # global rank that calls a rollout service for this replica
    reference: list | None = None  # the frozen pi_ref of the KL term (only when kl_beta > 0)


def main(argv: list[str] | None = None, engine: RolloutEngine | None = None) -> None:
    """Parse, set up, train. `engine` replaces the configured rollout engine (tests, custom)."""
    cfg = config.parse(argv)
    if cfg.logging.dry_run:  # parse, build on the meta device, print predicted memory
        dryrun.run(cfg)
        return
    if not cfg.data.data_path:
        raise config.ConfigError("--data-path is required: the pretraining windows to train on")
    init_distributed(cfg)
    try:
        with save_lock(cfg.checkpoint.save):
            train(setup(cfg, engine), train_step)
    finally:
        parallel.destroy()


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
    start = decay_start(cfg)
    if start is not None:  # Stable-then-Decay: the decay phase draws from its own blend
        done = max(progress.step - start, 0) * d.global_batch_size
        decay_data = _stream(cfg, tokenizer, layout, d.decay_data_path, done)
    if engine is None and cfg.rollout.rollout_url:
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
    return Run(
        cfg, layout, tokenizer, template, trainable, data, engine, progress, decay_data,
        talker, reference,
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
    start = decay_start(run.cfg)
    return run.decay_data if start is not None and t >= start else run.data


# Run-long counts in the metrics: total -> the per-step metric it sums. Checkpoints keep them
# (Progress.totals), so a resumed run continues them.
TOTALS = {"rollout_failures": "rollout_failed"}


def train(run: Run, step_fn: Callable[[Run, int], dict]) -> None:
    """`step_fn(run, t)` from where the run stands to T, with metrics and checkpoints."""
    cfg, log = run.cfg, run.cfg.logging
    is_logger = dist.get_rank() == 0
    start = run.progress.step
    writer = MetricsWriter(is_logger, log.metrics_file, log.tensorboard_dir, start_step=start)
    totals, first_reward = dict(run.progress.totals), None
    saves = AsyncSaves() if cfg.checkpoint.async_save else None
    for t in range(start, cfg.optim.train_iters):
        metrics = step_fn(run, t)
        metrics.update(getattr(run.engine, "metrics", dict)())  # fleet.FleetEngine's counts
        for total, per_step in TOTALS.items():
            totals[total] = totals.get(total, 0) + int(metrics[per_step])
            metrics[total] = totals[total]
        if first_reward is None and metrics.get("reward", 0.0) > 0:
            first_reward = t
        writer.write(t, metrics, console=t % log.log_interval == 0)
        run.progress = checkpoint.Progress(
            step=t + 1, consumed_samples=run.data.consumed_samples, totals=dict(totals)
        )
        if saves is not None:
            saves.poll()
        if cfg.checkpoint.save and _should_save(cfg, t + 1):
            path = checkpoint.save(cfg.checkpoint.save, run.trainable, run.progress, cfg, saves)
            if is_logger:
                print(f"{'saving' if saves else 'saved'} checkpoint {path}", flush=True)
    if saves is not None:
        saves.finish()  # the run's last save is published before it ends
    writer.close()
    if is_logger:
        reward = "never above 0" if first_reward is None else f"> 0 first at step {first_reward}"
        print(
            f"done: {cfg.optim.train_iters} steps; reward {reward} (this process); "
            f"metrics in {log.metrics_file}",
            flush=True,
        )


def train_step(run: Run, t: int) -> dict:
    """One RMT step t: returns its metrics (reduced over data-parallel ranks)."""
    cfg, r, tokenizer = run.cfg, run.cfg.rmt, run.tokenizer
    variant = VARIANTS[r.rmt_variant]
    start = time.perf_counter()
    data = data_for_step(run, t)
    microbatches = [next(data) for _ in range(cfg.num_microbatches)]
    budget, probs, selector = _schedule(run, variant, t)  # B_t, p(t) and how C is drawn

    # 1. NTP pass: per-token loss and entropy, buckets, CAS picks C, NTP loss off C.
    # 2. As each microbatch's C is chosen, its prefixes become prompts under budget B_t with G
    #    samples each; a rollout service starts sampling them while the pass goes on.
    make_requests = _request_maker(run, t, budget)
    rollouts = StepRollouts(
        run.engine, run.talker, make_requests, cfg.rollout.rollout_max_concurrency
    )
    step.zero_grads(run.trainable)
    ntp_start = time.perf_counter()
    weight = ntp_weight(variant, r.ntp_weight)
    ntp = step.ntp_pass(
        run.trainable, microbatches, selector, weight, r.entropy_chunk_tokens, rollouts.submit,
        fused_linear_chunk=r.fused_linear_chunk_tokens,
    )  # fmt: skip
    ntp_time = time.perf_counter() - ntp_start
    requests = make_requests(ntp.problems, 0)
    rollout_start = time.perf_counter()
    results = rollouts.results(requests)  # the time the step waits for them after the pass
    rollout_latency = time.perf_counter() - rollout_start
    failed = results is None  # the service failed: this step trains NTP only
    ntp.problems, requests, results = served(ntp.problems, requests, results)
    _check_versions(results, t, cfg.rollout.weight_sync_interval)

    # 3. Rewards and group-normalised advantages.
    scored = problems.score(
        ntp.problems, results, tokenizer, run.template, budget, r, variant.prefix_reward
    )
    adv, zero_groups = grpo.group_advantages(scored.rewards, delta=r.advantage_delta)

    # 4. RL pass into the same gradient buffers, 5. one optimizer step, weight sync.
    rl, total_count, rl_tokens = rl_update(run, requests, results, adv)
    grad_norm, lr = step.optimizer_step(run.trainable)
    step.gather_params(run.trainable)
    run.engine.sync_weights(t + 1)

    return step_metrics(
        ntp=ntp,
        rl=rl,
        scored=scored,
        zero_groups=zero_groups,
        total_rl_count=total_count,
        rl_tokens=rl_tokens,
        ntp_time=ntp_time,
        flops_per_token=train_flops_per_token(
            cfg.model, run.trainable.model[0].module.vocab_size, cfg.model.seq_length
        ),
        budget=budget,
        probs=probs,
        grad_norm=grad_norm,
        lr=lr,
        failed=failed,
        invalid=rollouts.invalid,
        dropped=rollouts.dropped,
        rollout_latency=rollout_latency,
        step_time=time.perf_counter() - start,
        window_tokens=sum(mb["tokens"].numel() for mb in microbatches),
    )


def _schedule(run: Run, variant, t: int):
    """Step t's token budget B_t (None without DTB), curriculum p(t) and position selector."""
    r, T = run.cfg.rmt, run.cfg.optim.train_iters
    budget = None
    if variant.budget:
        budget = budget_mod.token_budget(t, T, r.budget_initial, r.budget_min, r.budget_gamma)
    probs = selection.curriculum_probs(
        t, T, r.curriculum_start, r.curriculum_end, r.curriculum_t1, r.curriculum_t2
    )
    rpt = variant.selection == "all"
    selector = step.Selector(
        mode=variant.selection,
        probs=probs,
        k_per_unit=r.rpt_max_positions if rpt else r.positions_per_sequence,
        thresholds=tuple(r.entropy_thresholds) if r.bucket_mode == "fixed" else None,
        eod_id=run.tokenizer.eod,
        min_context=r.min_context,
        seed=run.cfg.parallel.seed + t,
        unit=r.position_unit,
        rpt_threshold=r.rpt_entropy_threshold,
    )
    return budget, probs, selector


def _request_maker(run: Run, t: int, budget: int | None) -> MakeRequests:
    """Step t's rollout requests: prompts under B_t, G samples each, seeded by step, replica
    and problem index."""
    seed = rollout_seed(run, t)

    def make(chosen: list[problems.Problem], first: int) -> list:
        return problems.make_requests(
            chosen, run.tokenizer, run.template, budget, run.cfg.rmt, seed, first
        )

    return make


def rollout_seed(run: Run, t: int) -> int:
    """Step t's sampling seed, distinct per data-parallel replica (independent samples)."""
    return (run.cfg.parallel.seed + 7919 * t) * run.layout.dp_size + run.layout.dp_rank


def _check_versions(results, t: int, sync_interval: int) -> None:
    """Rollouts must come from the weights of the last sync: step t, or up to k-1 steps older
    when weights are pushed every k steps."""
    for res in results:
        if not t - sync_interval < res.weight_version <= t:
            raise RuntimeError(
                f"rollout from weights v{res.weight_version}, trainer is at v{t} "
                f"(syncing every {sync_interval} steps)"
            )


def rl_update(run: Run, requests, results, adv):
    """The GRPO pass over this replica's groups, normalised by the RL count over all replicas.
    Returns (outcome, that count, RL response tokens over all replicas)."""
    r = run.cfg.rmt
    if run.cfg.model.rl_layout == "shared_prefix":
        groups = problems.shared_prefix_microbatches(
            requests, results, adv, run.tokenizer.eod, rl_length_multiple(run.cfg)
        )
    else:
        groups = problems.rl_microbatches(
            requests,
            results,
            adv,
            run.tokenizer.eod,
            r.rl_micro_batch_rows,
            rl_length_multiple(run.cfg),
        )
    local_count = sum(float(losses.rl_count(g["resp_mask"], r.loss_aggregation)) for g in groups)
    local_tokens = sum(float(g["resp_mask"].sum()) for g in groups)
    total_count, rl_tokens = parallel.all_reduce_sum_dp([local_count, local_tokens])
    kl = None
    if run.reference is None:  # no KL: a group whose advantages are all zero has no gradient
        groups = [g for g in groups if g["advantages"].abs().sum() > 0]
    else:
        kl = step.KL(r.kl_beta, r.kl_estimator)
        ref_logps = step.reference_logprobs(
            run.reference, groups, r.rollout_temperature, r.entropy_chunk_tokens
        )
        for g, ref_logp in zip(groups, ref_logps, strict=True):
            if ref_logp is not None:  # the last stage's, where the loss is computed
                g["ref_logp"] = ref_logp
    outcome = step.rl_pass(
        run.trainable,
        groups,
        max(total_count, 1.0),
        r.rollout_temperature,
        r.loss_aggregation,
        r.clip_eps,
        r.entropy_chunk_tokens,
        kl,
    )
    return outcome, total_count, rl_tokens


def rl_length_multiple(cfg: config.Config) -> int:
    """RL rows are padded to a multiple of TP when sequence parallelism splits them over TP."""
    return cfg.parallel.tensor_model_parallel_size if cfg.model.sequence_parallel else 1


def _should_save(cfg, steps_done: int) -> bool:
    interval = cfg.checkpoint.save_interval
    return steps_done == cfg.optim.train_iters or bool(interval and steps_done % interval == 0)


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
