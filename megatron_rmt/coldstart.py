"""Format cold start: a short supervised stage that teaches a small model the next-token-reasoning
format before RMT. Run like the trainer (one process, or torchrun at any TP/PP/DP):

    python -m megatron_rmt.coldstart --config MODEL.yaml configs/coldstart_cpu.yaml \\
        --load CKPT --data-path TRAIN_PREFIX --save OUT [--tokenizer-model CKPT]

RMT rewards a prediction only when it is readable: reasoning inside `<think></think>`, then
`\\boxed{token}`. A large reasoning model writes that from the instruction alone; a small one
does not (SmolLM2-135M: 0 of 48 samples parsed, PLATFORM.md), so every group scores 0 and GRPO
has no signal. The paper does not describe this stage; small models need it, large ones may
skip it (the reproduction scripts' COLDSTART=0).

1. Positions: the trainer's candidates (enough context, not EOD) of the *training* shards
   (only the documents of the train split, `--split`), cut into the trainer's windows, bucketed
   by the model's own entropy; `coldstart_per_level` drawn per level (`evaluation.positions`,
   the evaluation set's sampler).
2. Targets: the model's own top candidates at each position (one forward, vocab-parallel
   top-k). The think block lists them, most probable first, cut to exactly B tokens, and the
   box holds the model's top-1 guess (other think texts: `coldstart_think`; the guess token
   itself in the box: `coldstart_exact_box`). The true next token is never a target (it is
   only the unused label of that forward), so nothing of any evaluation position can leak
   (the held-out text is not even opened).
3. Prompts are the run's template (`--prompt-template`) with a budget B drawn uniformly from
   `coldstart_budgets` (default the run's own schedule range, B_T .. B_0), or, for a share
   `coldstart_free_share` of examples, without the budget sentence (the ablations without DTB
   and RPT start from the same checkpoint). The response ends with EOD, so sampling stops.
4. Supervised fine-tuning through the trainer's own NTP pass (Megatron schedule, fused CE):
   the loss mask is 1 on response tokens only, the prompt never trains; one optimizer step per
   `--global-batch-size` examples, `--lr`, `coldstart_epochs` passes. With
   `coldstart_ntp_windows` > 0 each step also trains that many plain windows of the training
   shards: L = mean SFT CE + `coldstart_ntp_weight` x mean NTP CE (each mean over its own
   global token count), so the model keeps next-token prediction (`ntp_then_scale`).
5. OUT gets the weights as a step-0 checkpoint (`--load` it with any run), the tokenizer and HF
   config files of `--load`, and `examples.jsonl` (every prompt and target, readable).

Deliberate choices:
- The think text is templated, not sampled: it costs one forward and reads like the
  instruction asks ("list multiple potential tokens and select the most probable one").
- `coldstart_restate_tokens` > 0 first restates the text's last tokens and continues them with
  the guess (`The text ends " is $10"`), so the guess follows its context as in plain NTP. It
  did not help SmolLM2-135M (docs/coldstart.md), so it is off by default. The other think
  texts (`restate`, `guess_first`, `guess_phrase`) and the `ntr_restated` template were
  measured on the tiny model (docs/coldstart.md): none reaches NTR >= 0.8 x NTP there.
- Whitespace-only candidates are listed as their escaped text (`"\\n"`); an answer that holds a
  brace or backslash (which `\\boxed{}` cannot carry unambiguously) drops the position.
"""

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_rmt import budget as budget_mod
from megatron_rmt import checkpoint, compute, config, parallel, prompts, selection, step
from megatron_rmt.build import build_trainable
from megatron_rmt.data import DataError, MicrobatchIterator, build_train_dataset, parse_data_path
from megatron_rmt.evaluation import forward
from megatron_rmt.evaluation.documents import read_documents
from megatron_rmt.evaluation.positions import draw_positions
from megatron_rmt.jsonl import InputError
from megatron_rmt.launch import init_distributed, model_vocab
from megatron_rmt.save_lock import save_lock
from megatron_rmt.schedule import position_ids
from megatron_rmt.tokenizer import tokenizer_of


@dataclass(frozen=True)
class Example:
    prefix_ids: list[int]  # the training text before the position
    prompt_ids: list[int]
    response_ids: list[int]  # think tokens, </think>, the boxed guess, EOD
    budget: int | None  # B in the prompt (None: no budget sentence)
    think_tokens: int  # tokens of the think block (= B when the candidates fill it)
    guess_id: int | None = None  # the boxed token: the model's own top-1 (never the truth)


def candidate_text(token_text: str) -> str:
    """A candidate as the think block lists it: stripped, or escaped when only whitespace."""
    stripped = token_text.strip()
    return stripped if stripped else json.dumps(token_text)[1:-1]


def think_ids(tokenizer, candidates: list[str], length: int, ending: str = "") -> list[int]:
    """`length` tokens of reasoning (fewer only when every candidate is listed): the text's
    `ending` restated and continued by the most probable candidate (when given), that candidate,
    then the others. `candidates` are token texts, best first."""
    shown = [candidate_text(c) for c in candidates]
    text = f'The text ends "{ending}{candidates[0]}". ' if ending else ""
    text += f'Most probable: "{shown[0]}". Other candidates:'
    text += "".join(f' "{c}",' for c in shown[1:])
    return tokenizer.encode(text)[:length]


def response_ids(
    tokenizer, candidates: list[str], think_length: int, ending: str = ""
) -> list[int] | None:
    """The target response: think tokens, `</think>`, `\\boxed{top-1}`, EOD. None when the
    top-1 guess cannot be written in a box."""
    answer = candidates[0].strip()
    if any(ch in answer for ch in "{}\\"):
        return None
    tail = tokenizer.encode(f"\n{prompts.THINK_CLOSE}\n\\boxed{{{answer}}}")
    return think_ids(tokenizer, candidates, think_length, ending) + tail + [tokenizer.eod]


def restate_think_ids(prefix_ids: list[int], guess_id: int, length: int, restate: int) -> list[int]:
    """`length` tokens of reasoning that put the guess where plain NTP makes it: the text's last
    r = min(restate, length - 1) tokens as they are, the guess continuing them, then the guess
    repeated to fill the budget (so the token before `</think>` is always the guess)."""
    r = min(restate, length - 1)
    ids = (prefix_ids[-r:] if r > 0 else []) + [guess_id]
    return ids + [guess_id] * (length - len(ids))


PHRASE = " is the most probable next token, so that is the answer."


def guess_phrase_ids(tokenizer, guess_id: int, length: int) -> list[int]:
    """`length` tokens: the guess, then a fixed phrase cut to fit. The think block ends on the
    same tokens every time (it closes where a small model can tell), and the guess sits a fixed
    distance before the box; with a constant budget every position of it is fixed."""
    return ([guess_id] + tokenizer.encode(PHRASE))[:length]


def box_ids(tokenizer, guess_id: int, exact: bool) -> list[int] | None:
    """`</think>`, the boxed guess, EOD. `exact`: the box holds the guess token itself (its
    leading space kept, which the match's normalisation strips), so answering is copying one
    token id; else the guess's stripped text, tokenized anew. None when a brace or backslash
    would make the box ambiguous."""
    text = tokenizer.token_text(guess_id)
    answer = text if exact else text.strip()
    if any(ch in answer for ch in "{}\\"):
        return None
    if exact:
        head = tokenizer.encode(f"\n{prompts.THINK_CLOSE}\n\\boxed{{")
        return head + [guess_id] + tokenizer.encode("}") + [tokenizer.eod]
    return tokenizer.encode(f"\n{prompts.THINK_CLOSE}\n\\boxed{{{answer}}}") + [tokenizer.eod]


def budget_range(cfg: config.Config) -> tuple[int, int]:
    """[low, high] of the budgets asked for: `coldstart_budgets`, else the run's B_T .. B_0."""
    if cfg.coldstart.coldstart_budgets:
        low, high = cfg.coldstart.coldstart_budgets
        return low, high
    r = cfg.rmt
    T = cfg.optim.train_iters
    return budget_mod.token_budget(
        T, T, r.budget_initial, r.budget_min, r.budget_gamma
    ), r.budget_initial


def build_examples(
    prefixes: list[list[int]],
    tops: list[list[int]],  # per position: the model's top-k token ids, most probable first
    tokenizer,
    template: prompts.PromptTemplate,
    budgets: tuple[int, int],
    free_share: float,
    seed: int,
    restate: int = 0,
    think: str = "candidates",
    exact_box: bool = False,
) -> list[Example]:
    """One example per position. Special tokens (EOD, chat markers) are never candidates: a
    chosen position's true next token never is one. Positions whose guess cannot be boxed are
    dropped, and with `think="restate"` those whose restated tokens hold a special token."""
    rng = random.Random(seed)
    special = tokenizer.special_ids()
    out = []
    for prefix, top in zip(prefixes, tops, strict=True):
        length = rng.randint(*budgets)
        budget = None if rng.random() < free_share else length
        top = [t for t in top if t not in special]
        if not top:
            continue
        if think == "guess_phrase":
            reasoning = guess_phrase_ids(tokenizer, top[0], length)
        elif think in ("restate", "guess_first"):  # guess_first: restate nothing
            reasoning = restate_think_ids(
                prefix, top[0], length, restate if think == "restate" else 0
            )
            if special & set(reasoning):
                continue
        else:
            candidates = [tokenizer.token_text(t) for t in top]
            ending = tokenizer.decode(prefix[-restate:]) if restate else ""
            reasoning = think_ids(tokenizer, candidates, length, ending)
        tail = box_ids(tokenizer, top[0], exact_box)
        if tail is None:
            continue
        prompt = prompts.build_prompt_ids(tokenizer, template, prefix, budget)
        out.append(Example(prefix, prompt, reasoning + tail, budget, len(reasoning), top[0]))
    return out


def sft_microbatch(examples: list[Example], length: int, pad_id: int) -> dict:
    """Rows of prompt + response right-padded to `length` inputs; the loss mask is 1 exactly on
    the labels that are response tokens. Keys as the trainer's NTP microbatches."""
    b = len(examples)
    tokens = torch.full((b, length + 1), pad_id, dtype=torch.long)  # [b, s+1]
    mask = torch.zeros(b, length)  # [b, s]
    for i, ex in enumerate(examples):
        row = ex.prompt_ids + ex.response_ids
        tokens[i, : len(row)] = torch.tensor(row)
        p = len(ex.prompt_ids)
        mask[i, p - 1 : len(row) - 1] = 1.0  # label i is token i+1: response tokens only
    inputs = tokens[:, :-1]
    return {
        "tokens": inputs,
        "labels": tokens[:, 1:],
        "loss_mask": mask,
        "position_ids": position_ids(inputs),
    }


def step_batches(
    examples: list[Example], global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
    pad_id: int,
) -> list[list[dict]]:  # fmt: skip
    """Per optimizer step, this replica's microbatches, all padded to the step's longest row
    (one shape per schedule call). A last partial batch is dropped."""
    per_rank = global_batch // dp_size
    out = []
    for first in range(0, len(examples) - global_batch + 1, global_batch):
        batch = examples[first : first + global_batch]
        length = max(len(e.prompt_ids) + len(e.response_ids) for e in batch) - 1
        mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        out.append(
            [
                sft_microbatch(mine[m : m + micro_batch], length, pad_id)
                for m in range(0, per_rank, micro_batch)
            ]
        )
    return out


def training_documents(prefix: str, tokenizer, split: str, limit: int | None) -> list[list[int]]:
    """The first `limit` documents of the shard's *train* split (Megatron splits by document:
    the first split[0] / sum(split) of them), so the valid/test documents, which may serve as
    held-out text, are never read."""
    count = len(IndexedDataset(prefix).document_indices) - 1
    weights = [float(w) for w in re.split(r"[,/]", split) if w.strip()]
    bound = int(round(weights[0] / sum(weights) * count))
    return read_documents(prefix, tokenizer, limit=bound if limit is None else min(limit, bound))


def training_positions(cfg: config.Config, tokenizer, model: list) -> tuple[list, list]:
    """Positions of the training shards (`evalset.EvalPosition`) and the model's own top
    `coldstart_candidates` token ids at each, most probable first. The positions' true tokens
    are the forward's labels (its loss is not used) and reach nothing else."""
    cs, r = cfg.coldstart, cfg.rmt
    prefixes, _ = parse_data_path(cfg.data.data_path)
    docs = [
        doc
        for prefix in prefixes
        for doc in training_documents(prefix, tokenizer, cfg.data.split, cs.coldstart_max_documents)
    ]
    positions, counts = draw_positions(
        cfg, tokenizer, model, docs, cs.coldstart_per_level, cfg.parallel.seed,
        cfg.data.micro_batch_size, ",".join(prefixes),
    )  # fmt: skip
    rows = [p.prefix_ids + [p.target_id] for p in positions]
    masks = [[False] * (len(p.prefix_ids) - 1) + [True] for p in positions]
    length = max(len(p.prefix_ids) for p in positions)
    batches = forward.padded_microbatches(
        rows, masks, length, cfg.data.micro_batch_size, tokenizer.eod
    )
    stats = forward.stats_in_groups(
        model, batches, tokenizer.vocab_size, r.entropy_chunk_tokens, False,
        cs.coldstart_candidates,
    )  # fmt: skip
    if dist.get_rank() == 0:
        print(f"cold start: {len(positions)} positions, levels {counts['sampled']}", flush=True)
    return positions, torch.cat([s["top"] for s in stats]).tolist()


def training_examples(cfg: config.Config, tokenizer, model: list) -> list[Example]:
    """Positions of the training shards and the model's own top candidates there."""
    return examples_at(cfg, tokenizer, *training_positions(cfg, tokenizer, model))


def examples_at(cfg: config.Config, tokenizer, positions: list, tops: list) -> list[Example]:
    """The examples of `training_positions`' output (the run's template and budgets)."""
    cs = cfg.coldstart
    template = prompts.load_template(cfg.rmt.prompt_template)
    return build_examples(
        [p.prefix_ids for p in positions], tops, tokenizer, template, budget_range(cfg),
        cs.coldstart_free_share, cfg.parallel.seed, cs.coldstart_restate_tokens,
        cs.coldstart_think, cs.coldstart_exact_box,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    cfg = config.parse(argv)
    if not cfg.data.data_path or not cfg.checkpoint.load or not cfg.checkpoint.save:
        raise config.ConfigError("coldstart needs --data-path (training shards), --load and --save")
    init_distributed(cfg)
    try:
        # Bad shards on any node stop every rank here, before the model is built.
        parallel.agree(lambda: parse_data_path(cfg.data.data_path), DataError)
        with save_lock(cfg.checkpoint.save):
            run(cfg)
    finally:
        parallel.destroy()


def run(cfg: config.Config) -> list[float]:
    """Build the examples, fine-tune, save; returns the SFT loss of every step."""
    tokenizer = tokenizer_of(cfg.data)
    vocab = model_vocab(cfg, tokenizer)
    model = forward.build_eval_model(cfg.model, vocab, cfg.checkpoint.load)
    examples = training_examples(cfg, tokenizer, model)
    del model
    d = cfg.data
    epochs = in_epochs(examples, cfg.coldstart.coldstart_epochs, cfg.parallel.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    steps = step_batches(
        epochs, d.global_batch_size, d.micro_batch_size, dp_rank, dp_size, tokenizer.eod
    )
    steps = steps[: cfg.coldstart.coldstart_max_steps]  # None: every step of every epoch
    if not steps:
        raise InputError(f"{len(examples)} examples: fewer than one --global-batch-size")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, train_iters=len(steps)))
    trainable = build_trainable(cfg, vocab)
    checkpoint.load(cfg.checkpoint.load, trainable, load_optimizer=False)
    sft_only = selection.Selector(None, (1.0, 0.0, 0.0), 0, None, tokenizer.eod, 0, 0)
    windows = ntp_windows(cfg, tokenizer, len(steps), dp_rank, dp_size)
    losses, ntp_losses, flops = [], [], 0.0
    for t, microbatches in enumerate(steps):
        trainable.zero_grads()
        ntp, computed = "", compute.window_computed(microbatches)
        if windows:
            batches = [next(windows) for _ in range(windows.num_microbatches)]
            computed += compute.window_computed(batches)
            ntp_losses.append(ntp_then_scale(trainable, batches, microbatches, cfg, tokenizer.eod))
            ntp = f"| ntp loss {ntp_losses[-1]:.4f} "
        flops += compute.pass_flops(cfg.model, vocab, computed, True)
        outcome = step.ntp_pass(
            trainable, microbatches, sft_only, 1.0, cfg.rmt.entropy_chunk_tokens
        )
        grad_norm, _ = trainable.optimizer_step()
        n, loss = parallel.all_reduce_sum_dp([outcome.ntp_tokens, outcome.ntp_loss_sum])
        losses.append(loss / max(n, 1))
        if dist.get_rank() == 0:
            print(
                f"cold start step {t + 1}/{len(steps)} | sft loss {losses[-1]:.4f} {ntp}| "
                f"response tokens {n:.0f} | grad norm {grad_norm:.3f}",
                flush=True,
            )
    flops = parallel.all_reduce_sum_dp([flops])[0]
    _save(cfg, trainable, tokenizer, examples, losses, ntp_losses, flops)
    return losses


def in_epochs(examples: list[Example], epochs: int, seed: int) -> list[Example]:
    """The examples `epochs` times, each pass in its own seeded order."""
    order, out = list(range(len(examples))), []
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        out += [examples[i] for i in order]
    return out


def ntp_windows(cfg: config.Config, tokenizer, steps: int, dp_rank: int, dp_size: int):
    """The trainer's own stream of training windows (same split, seed and order as an NTP run),
    `coldstart_ntp_windows` per step; None without NTP mixing."""
    per_step = cfg.coldstart.coldstart_ntp_windows
    if per_step <= 0:
        return None
    d = cfg.data
    dataset = build_train_dataset(
        d.data_path, d.split, cfg.model.seq_length, steps * per_step, cfg.parallel.seed,
        tokenizer, d.data_cache_path,
    )  # fmt: skip
    micro = min(d.micro_batch_size, max(per_step // dp_size, 1))
    return MicrobatchIterator(dataset, micro, per_step, dp_rank, dp_size)


def ntp_then_scale(
    trainable, batches: list[dict], sft_microbatches: list[dict], cfg, eod: int
) -> float:
    """The NTP term of one step over the windows `batches`, first: its gradients,
    w x (sum of CE) / (NTP tokens), then scaled by the step's SFT token count, so that the SFT
    pass after it (which divides every gradient by that count) leaves w x mean NTP CE + mean
    SFT CE. Returns the NTP loss."""
    plain = selection.Selector(None, (1.0, 0.0, 0.0), 0, None, eod, 0, 0)
    weight = cfg.coldstart.coldstart_ntp_weight
    outcome = step.ntp_pass(trainable, batches, plain, weight, cfg.rmt.entropy_chunk_tokens)
    local = sum(float((mb["loss_mask"] > 0).sum()) for mb in sft_microbatches)
    n_sft = parallel.all_reduce_sum_dp([local])[0]
    for chunk in trainable.model:
        chunk.scale_gradients(n_sft)
    n, loss = parallel.all_reduce_sum_dp([outcome.ntp_tokens, outcome.ntp_loss_sum])
    return loss / max(n, 1)


def _save(
    cfg, trainable, tokenizer, examples: list[Example], losses: list[float], ntp_losses: list,
    flops: float,
) -> None:  # fmt: skip
    out = cfg.checkpoint.save
    trainable.gather_params()
    path = checkpoint.save_model(out, trainable.model[0].module, cfg)
    if dist.get_rank() != 0:
        return
    for name in os.listdir(cfg.checkpoint.load):  # tokenizer and HF config travel along
        src = os.path.join(cfg.checkpoint.load, name)
        if os.path.isfile(src) and name != checkpoint.TRACKER:
            shutil.copy(src, os.path.join(out, name))
    with open(os.path.join(out, "examples.jsonl"), "w", encoding="utf-8") as fh:
        for ex in examples:
            record = {
                "budget": ex.budget,
                "think_tokens": ex.think_tokens,
                "prompt": tokenizer.decode(ex.prompt_ids),
                "response": tokenizer.decode(ex.response_ids),
            }
            fh.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "coldstart.json"), "w") as fh:
        json.dump({"examples": len(examples), "steps": len(losses),
                   "epochs": cfg.coldstart.coldstart_epochs, "sft_loss": losses,
                   "ntp_loss": ntp_losses, "flops": flops}, fh)  # fmt: skip
    print(f"cold start: {len(losses)} steps, checkpoint {path}, examples {out}", flush=True)


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
