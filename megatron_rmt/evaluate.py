"""Evaluate models the way the RMT paper does: NTP and NTR accuracy on easy / medium / hard
tokens (Table 1) and response length (Table 3). Run under torchrun like the trainer, with its
flags for the model, tokenizer, parallelism, `--load` and `--rollout-url`:

    python -m megatron_rmt.evaluate build-set --eval-data HELD_OUT --output set.jsonl \\
        --per-level 100 --config configs/tiny_cpu.yaml --load PROXY_CKPT
    torchrun --nproc-per-node 2 -m megatron_rmt.evaluate run --eval-set set.jsonl \\
        --output base.json --samples 8 --config ... --load CKPT --tensor-model-parallel-size 2
    python -m megatron_rmt.evaluate table base.json rmt.json --output table.md

1. build-set: a proxy model (`--load`) computes the entropy of every candidate position of the
   held-out documents, which are bucketed with the trainer's rules (`--entropy-thresholds`, or
   `--bucket-mode quantile` over the whole held-out set; `--min-context`), and `--per-level`
   positions per level are drawn with `--sample-seed`. Difficulty is fixed there, once, so every
   model compared is scored on the same easy / medium / hard tokens.
2. run: NTP accuracy (greedy argmax of one forward of each prefix == the true next token) and
   NTR accuracy (the trainer's prompt template, `--budget` or none, `--samples` G responses from
   the rollout engine, pass@1 averaged over them), per level, with mean response and thinking
   length and the share of unreadable answers. Data-parallel replicas split the positions.
3. table: results files side by side as a markdown table.
Without `--load`, `run` evaluates the random initialisation of `--seed` (a smoke test).
"""

import argparse
import dataclasses
import json
import os
import sys
import types

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_rmt import config, parallel, prompts, selection
from megatron_rmt.budget import budget_deviation
from megatron_rmt.data import DataError, check_shard
from megatron_rmt.evaluation import evalset, forward, ntr, report
from megatron_rmt.evaluation.documents import read_documents
from megatron_rmt.evaluation.positions import draw_positions
from megatron_rmt.jsonl import InputError
from megatron_rmt.launch import init_distributed, served_vocab
from megatron_rmt.rollout.contract import RolloutEngine
from megatron_rmt.rollout.embedded import EmbeddedEngine
from megatron_rmt.rollout.engines import build_engine


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rmt.evaluate",
        description="RMT evaluation; any other flag is the trainer's (model, tokenizer, --load)",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-set", allow_abbrev=False, help="fix the evaluation positions")
    build.add_argument("--eval-data", required=True, help="JSONL file or indexed dataset prefix")
    build.add_argument("--output", required=True, help="the set's JSONL file")
    build.add_argument("--per-level", type=int, default=100, help="positions drawn per level")
    build.add_argument("--sample-seed", type=int, default=1234, help="seed of that draw")
    build.add_argument("--text-field", default="text", help="the JSONL field with the text")
    build.add_argument("--max-documents", type=int, default=None, help="read at most this many")
    run = sub.add_parser("run", allow_abbrev=False, help="evaluate one model on a set")
    run.add_argument("--eval-set", required=True, help="a set file from build-set")
    run.add_argument("--output", required=True, help="results JSON file")
    run.add_argument("--name", default=None, help="row label (default: --load's folder name)")
    run.add_argument("--samples", type=int, default=8, help="G responses per position; 0: no NTR")
    run.add_argument("--budget", type=int, default=None, help="thinking budget in the prompt")
    run.add_argument("--ntr-batch", type=int, default=8, help="positions per rollout batch")
    for p in (build, run):
        p.add_argument("--eval-micro-batch", type=int, default=4, help="sequences per forward")
    table = sub.add_parser("table", allow_abbrev=False, help="results side by side")
    table.add_argument("results", nargs="+", help="results JSON files from `run`")
    table.add_argument("--output", default=None, help="also write the table here")
    table.add_argument("--flops", nargs="*", default=[], help="NAME=FLOPS: a training-FLOPs column")
    return parser


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, config.Config | None]:
    """The command's own flags, and the trainer's Config from every other flag (None for
    `table`, which takes no model)."""
    args, rest = _parser().parse_known_args(argv)
    if args.command == "table":
        if rest:
            raise config.ConfigError(f"table takes no other flags: {rest}")
        return args, None
    return args, config.parse(rest)


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse(argv)
    if cfg is None:
        report.show(
            report.render_table(
                [report.read_results(p) for p in args.results], report.parse_flops(args.flops)
            ),
            args.output,
        )
        return
    init_distributed(cfg)
    try:
        if args.command == "build-set" and not os.path.isfile(args.eval_data):
            # A bad shard on any node stops every rank here, before the model is built.
            parallel.agree(lambda: check_shard(args.eval_data), DataError)
        (build_set if args.command == "build-set" else run)(args, cfg)
    finally:
        parallel.destroy()


def build_set(args, cfg: config.Config) -> None:
    """Proxy entropies of every candidate of the held-out documents, levels, the seeded draw;
    rank 0 writes the set."""
    if args.per_level < 1:
        raise SystemExit("--per-level must be at least 1")
    tokenizer, model = forward.tokenizer_and_model(cfg)
    docs = read_documents(args.eval_data, tokenizer, args.text_field, args.max_documents)
    positions, counts = draw_positions(
        cfg, tokenizer, model, docs, args.per_level, args.sample_seed, args.eval_micro_batch,
        args.eval_data,
    )  # fmt: skip
    header = {
        "source": os.path.abspath(args.eval_data),
        "proxy": cfg.checkpoint.load,
        "tokenizer": tokenizer.source,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "seq_length": cfg.model.seq_length,
        "min_context": cfg.rmt.min_context,
        "bucket_mode": cfg.rmt.bucket_mode,
        "per_level": args.per_level,
        "sample_seed": args.sample_seed,
        "documents": len(docs),
        **counts,
    }
    if dist.get_rank() == 0:
        evalset.write_set(args.output, header, positions)
        print(f"wrote {len(positions)} positions to {args.output}: {_counts(header)}", flush=True)


def _counts(header: dict) -> str:
    pairs = zip(selection.LEVELS, header["sampled"], header["available"], strict=True)
    return ", ".join(f"{name} {n} of {avail}" for name, n, avail in pairs)


def run(args, cfg: config.Config, engine: RolloutEngine | None = None) -> dict:
    """Evaluate `--load` on `--eval-set`; writes and returns the results. `engine` replaces the
    configured rollout engine (tests, custom engines)."""
    header, positions = evalset.read_set(args.eval_set)
    tokenizer, model = forward.tokenizer_and_model(cfg)
    if (header.get("vocab_size"), header.get("eod")) != (tokenizer.vocab_size, tokenizer.eod):
        raise InputError(
            f"{args.eval_set}: built for a tokenizer with {header.get('vocab_size')} tokens and "
            f"EOD {header.get('eod')}, this model's has {tokenizer.vocab_size} and {tokenizer.eod}"
        )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if len(positions) < dp_size:
        raise SystemExit(f"{len(positions)} positions cannot be split over {dp_size} replicas")
    mine = list(range(dp_rank, len(positions), dp_size))  # this replica's share, by set index
    rows = _evaluate(args, cfg, tokenizer, model, positions, mine, engine)
    rows = _gather_replicas(rows, dp_size)
    levels = torch.tensor([p.level for p in positions])
    results = {
        "name": args.name or os.path.basename(os.path.normpath(cfg.checkpoint.load or "init")),
        "load": cfg.checkpoint.load,
        "eval_set": os.path.abspath(args.eval_set),
        "set_header": header,
        "settings": {
            "samples": args.samples,
            "budget": args.budget,
            "template": cfg.rmt.prompt_template,
            "temperature": cfg.rmt.rollout_temperature,
            "top_p": cfg.rmt.rollout_top_p,
            "max_response_tokens": cfg.rmt.max_response_tokens,
            "response_cap": cfg.rmt.response_cap,  # problems.response_cap, as in training
            "engine": "vllm" if cfg.rollout.rollout_url else "embedded",
        },
        "ntp": report.summarize_ntp(levels, rows["ntp_correct"], rows["ntp_loss"]),
        "ntr": None,
        # per position, in set order: what evaluation/paired.py resamples (same positions)
        "per_position": {
            "positions": [[p.doc, p.offset] for p in positions],
            "ntp": rows["ntp_correct"].double().tolist(),
            "ntp_loss": rows["ntp_loss"].double().tolist(),
            "ntr": rows["match"].double().mean(dim=-1).tolist() if args.samples > 0 else None,
        },
    }
    if args.samples > 0:
        results["ntr"] = report.summarize_ntr(
            levels, rows["match"], rows["think_tokens"], rows["response_tokens"], rows["unparsed"]
        )
        if args.budget:  # how closely the readable responses' thinking follows B
            parsed = rows["think_tokens"][~rows["unparsed"]]
            results["ntr"]["budget_dev"] = budget_deviation(parsed, args.budget)
    if dist.get_rank() == 0:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1)
        print(report.render_table([results]), flush=True)
        print(f"results: {args.output}", flush=True)
    return results


def _evaluate(args, cfg, tokenizer, model, all_positions, indices, engine) -> dict:
    """The positions at `indices` of the set: NTP correctness and loss `[n]`, NTR match /
    lengths / unparsed `[n, G]` (G = 0 without NTR)."""
    positions = [all_positions[i] for i in indices]
    rows = [p.prefix_ids + [p.target_id] for p in positions]
    masks = [[False] * (len(p.prefix_ids) - 1) + [True] for p in positions]
    length = max(len(p.prefix_ids) for p in positions)
    batches = forward.padded_microbatches(rows, masks, length, args.eval_micro_batch, tokenizer.eod)
    stats = forward.stats_in_groups(
        model, batches, tokenizer.vocab_size, cfg.rmt.entropy_chunk_tokens, True
    )
    target = torch.tensor([p.target_id for p in positions])
    out = {
        "ntp_correct": torch.cat([s["argmax"] for s in stats]) == target,
        "ntp_loss": torch.cat([s["loss"] for s in stats]),
    }
    empty = torch.zeros(len(positions), 0)
    scored = dict.fromkeys(("match", "think_tokens", "response_tokens", "unparsed"), empty)
    if args.samples > 0:
        scored = vars(_ntr(args, cfg, tokenizer, model, positions, indices, engine))
    return {**out, **{k: scored[k] for k in ("match", "think_tokens", "response_tokens")},
            "unparsed": scored["unparsed"].bool()}  # fmt: skip


def _rollout_engine(cfg, tokenizer, model: list) -> RolloutEngine:
    """vLLM servers when `--rollout-url` is set, loaded with this checkpoint's weights through
    the trainer's weight sync (so they serve the model being evaluated); else the embedded
    engine over the model itself."""
    if cfg.rollout.rollout_url:
        holder = types.SimpleNamespace(model=model)  # the one field the weight sync reads
        engine = build_engine(cfg, holder, tokenizer, served_vocab(cfg, tokenizer))
    else:
        engine = EmbeddedEngine(model, tokenizer.vocab_size, tokenizer.eod)
    engine.sync_weights(0)
    return engine


def _ntr(args, cfg, tokenizer, model, positions, indices, engine):
    engine = engine or _rollout_engine(cfg, tokenizer, model)
    rmt = dataclasses.replace(cfg.rmt, group_size=args.samples)
    bar = tqdm(total=len(positions), desc="NTR", unit="pos", disable=dist.get_rank() != 0)
    with bar:
        return ntr.ntr_scores(
            positions,
            indices,
            engine,
            parallel.replica_talker(),
            tokenizer,
            prompts.load_template(cfg.rmt.prompt_template),
            args.budget,
            rmt,
            cfg.parallel.seed,
            args.ntr_batch,
            cfg.rollout.rollout_max_concurrency,
            bar.update,
        )


def _gather_replicas(rows: dict, dp_size: int) -> dict:
    """Every replica's rows, back in set order (replica r holds positions r, r + dp, ...)."""
    if dp_size == 1:
        return rows
    parts = [None] * dp_size
    dist.all_gather_object(parts, rows, group=ps.get_data_parallel_group())
    out = {}
    for key in rows:
        pieces = [part[key] for part in parts]
        total = sum(len(x) for x in pieces)
        merged = torch.empty((total, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
        for r, piece in enumerate(pieces):
            merged[r::dp_size] = piece
        out[key] = merged
    return out


if __name__ == "__main__":  # dist_checkpointing may start worker processes: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
