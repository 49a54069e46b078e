"""Throughput of tools/preprocess_data.py against its floor, the bare fast tokenizer.

    python benchmarks/preprocess.py [--input ../shared/assets/math/math_train.jsonl] [--repeats 3]

For 1 and 2 workers, on every line of the input (keys `problem` and `solution`, Qwen3 tokenizer):
- tool: preprocess_data.main(), reading, validating, tokenizing, appending EOD and writing
  .bin/.idx, timed from its first chunk to its last write (its own `Stats.seconds`);
- bare: the same texts, already parsed in memory, encoded by `tokenizers.Tokenizer.encode` in
  the same number of processes (forked, chunked the same way), nothing written.
Each pair runs interleaved `--repeats` times and the best of each is kept, since other load on the
machine only ever slows a run down. The target is tool >= 80% of bare documents/s.
"""

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time

from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "..", "shared", "assets")
KEYS = ("problem", "solution")
CHUNK = 128  # documents per task, as the tool sends lines

_spec = importlib.util.spec_from_file_location(
    "preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py")
)
preprocess_data = importlib.util.module_from_spec(_spec)
sys.modules["preprocess_data"] = preprocess_data
_spec.loader.exec_module(preprocess_data)

_BARE = None  # the bare tokenizer, inherited by forked workers


def _count_tokens(texts: list[str]) -> int:
    return sum(len(_BARE.encode(t, add_special_tokens=False).ids) for t in texts)


def run_bare(records: list[dict], workers: int) -> tuple[float, int]:
    chunks = [
        [r[k] for r in records[i : i + CHUNK] for k in KEYS] for i in range(0, len(records), CHUNK)
    ]
    if workers == 1:
        start = time.perf_counter()
        tokens = sum(map(_count_tokens, chunks))
        return time.perf_counter() - start, tokens
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        tokens = sum(pool.imap(_count_tokens, chunks))
        return time.perf_counter() - start, tokens


def run_tool(path: str, tokenizer_dir: str, workers: int, out_dir: str) -> tuple[float, int]:
    argv = ["--input", path, "--output-prefix", os.path.join(out_dir, "bench")]
    argv += ["--json-keys", *KEYS, "--append-eod", "--workers", str(workers)]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    stats = preprocess_data.main(argv)
    return stats.seconds, stats.tokens


def main() -> None:
    global _BARE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=os.path.join(ASSETS, "math", "math_train.jsonl"))
    p.add_argument("--tokenizer-model", default=os.path.join(ASSETS, "tokenizers", "qwen3"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with open(args.input, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    _BARE = Tokenizer.from_file(os.path.join(args.tokenizer_model, "tokenizer.json"))
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for workers in (1, 2):
            best = {"tool": (float("inf"), 0), "bare": (float("inf"), 0)}
            for _ in range(args.repeats):
                for name, result in (
                    ("tool", run_tool(args.input, args.tokenizer_model, workers, out_dir)),
                    ("bare", run_bare(records, workers)),
                ):
                    best[name] = min(best[name], result)
            rows.append((workers, best["tool"], best["bare"]))

    docs = len(records)
    print(f"\n{docs} lines x keys {KEYS} of {args.input}, best of {args.repeats}")
    print(f"{'workers':>7} | {'tool docs/s':>11} {'tool tok/s':>11} | "
          f"{'bare docs/s':>11} {'bare tok/s':>11} | tool/bare")  # fmt: skip
    for workers, (t_sec, t_tok), (b_sec, b_tok) in rows:
        print(
            f"{workers:>7} | {docs / t_sec:>11.0f} {t_tok / t_sec:>11.0f} | "
            f"{docs / b_sec:>11.0f} {b_tok / b_sec:>11.0f} | {b_sec / t_sec:>8.0%}"
        )


if __name__ == "__main__":
    main()
