"""NTP loss on held-out text: the mean next-token cross-entropy over every position of held-out
documents, cut into the trainer's windows. Run like `evaluate` (trainer flags for the model,
tokenizer, parallelism and `--load`; any TP/PP):

    python -m megatron_rmt.evaluation.text_loss --eval-data HELD_OUT --output loss.json \\
        --config configs/tiny_cpu.yaml --load CKPT

`evaluate run` reports the loss only at the set's positions, which are drawn by difficulty; this
is the plain language-modelling loss of the text, the number the cold start must not raise.

Deliberate choices:
- Windows as the evaluation set's (`evalset.document_windows`: consecutive `seq_length` inputs,
  context restarting at each window), every label of every window counted once; the
  documents' end-of-document token is not appended (read_documents drops it).
- The mean is over tokens (not over documents), in float64, the trainer's fused kernel over the
  padded vocabulary as in training.
"""

import argparse
import json
import os
import sys

import torch.distributed as dist

from megatron_rmt import config, parallel
from megatron_rmt.evaluation import evalset, forward
from megatron_rmt.evaluation.documents import read_documents


def text_loss(
    model: list, docs: list[list[int]], seq_length: int, micro_batch: int, eod: int,
    vocab_size: int, chunk_tokens: int,
) -> tuple[float, int]:  # fmt: skip
    """(mean cross-entropy in nats, number of tokens) over every label of `docs`' windows."""
    rows = [w for _, _, w in evalset.document_windows(docs, seq_length)]
    masks = [[True] * (len(w) - 1) for w in rows]
    length = max(len(w) - 1 for w in rows)
    batches = forward.padded_microbatches(rows, masks, length, micro_batch, eod)
    total, count = 0.0, 0
    for first in range(0, len(batches), 32):
        for s in forward.position_stats(
            model, batches[first : first + 32], vocab_size, chunk_tokens, False
        ):
            total += float(s["loss"].double().sum())
            count += s["loss"].numel()
    return total / max(count, 1), count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_rmt.evaluation.text_loss")
    p.add_argument("--eval-data", required=True, help="JSONL file or indexed dataset prefix")
    p.add_argument("--output", default=None, help="write {'loss', 'tokens', ...} here")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--text-field", default="text")
    p.add_argument("--eval-micro-batch", type=int, default=8)
    args, rest = p.parse_known_args(argv)
    cfg = config.parse(rest)
    from megatron_rmt.evaluation.forward import tokenizer_and_model
    from megatron_rmt.launch import init_distributed

    init_distributed(cfg)
    try:
        tokenizer, model = tokenizer_and_model(cfg)
        docs = read_documents(args.eval_data, tokenizer, args.text_field, args.max_documents)
        loss, tokens = text_loss(
            model, docs, cfg.model.seq_length, args.eval_micro_batch, tokenizer.eod,
            tokenizer.vocab_size, cfg.rmt.entropy_chunk_tokens,
        )  # fmt: skip
        if dist.get_rank() == 0:
            out = {"load": cfg.checkpoint.load, "eval_data": os.path.abspath(args.eval_data),
                   "documents": len(docs), "tokens": tokens, "loss": loss}  # fmt: skip
            print(f"held-out NTP loss {loss:.4f} over {tokens} tokens of {len(docs)} documents")
            if args.output:
                with open(args.output, "w") as fh:
                    json.dump(out, fh, indent=1)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.run_cli(main, sys.argv[1:])
