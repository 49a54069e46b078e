"""Build the project's JSONL corpora from the offline assets, and optionally tokenize them.

    python tools/build_corpora.py                       # data/math_train.jsonl, data/austen.jsonl
    python tools/build_corpora.py --tokenizer-model ../shared/assets/tokenizers/qwen3
                                                        # ... plus data/<name>_text_document.bin/.idx
    python tools/build_corpora.py --sample              # regenerate corpus/sample_math.jsonl

Corpora (one `{"text": ...}` document per line):
- math_train: every MATH training problem as "Question: <problem>\\nAnswer: <worked solution>",
  the mid-training text RMT reasons over (MATH is MIT-licensed).
- austen: Jane Austen's six novels in ~4 KB pieces (public domain), plain English prose.

Deliberate choices: documents keep the assets' order, so rebuilding gives identical files; the
shipped sample is the first `--sample-docs` math documents, made by the same formatting code;
tokenization is delegated to tools/preprocess_data.py (a subprocess, exactly the user's CLI).
"""

import argparse
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_ASSETS = os.path.join(_REPO, "..", "shared", "assets")


def math_document(record: dict) -> str:
    return f"Question: {record['problem']}\nAnswer: {record['solution']}"


def write_math(source: str, destination: str, limit: int | None = None) -> int:
    """Write MATH records as Question/Answer documents; return how many were written."""
    count = 0
    with open(source, encoding="utf-8") as src, open(destination, "w", encoding="utf-8") as dst:
        for line in src:
            if limit is not None and count == limit:
                break
            dst.write(json.dumps({"text": math_document(json.loads(line))}) + "\n")
            count += 1
    return count


def write_austen(source: str, destination: str) -> int:
    """Copy the Austen pieces, keeping only their text (the novel name stays as `source`)."""
    count = 0
    with open(source, encoding="utf-8") as src, open(destination, "w", encoding="utf-8") as dst:
        for line in src:
            record = json.loads(line)
            dst.write(json.dumps({"text": record["text"], "source": record["source"]}) + "\n")
            count += 1
    return count


def tokenize(jsonl: str, prefix: str, tokenizer_model: str, workers: int) -> None:
    script = os.path.join(_REPO, "tools", "preprocess_data.py")
    command = [
        sys.executable, script, "--input", jsonl, "--output-prefix", prefix,
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_model,
        "--append-eod", "--workers", str(workers),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=_DEFAULT_ASSETS, help="the offline assets folder")
    p.add_argument("--output-dir", default=os.path.join(_REPO, "data"))
    p.add_argument("--tokenizer-model", help="also tokenize with this HF tokenizer directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sample", action="store_true", help="write corpus/sample_math.jsonl only")
    p.add_argument("--sample-docs", type=int, default=500)
    args = p.parse_args(argv)

    math_source = os.path.join(args.assets, "math", "math_train.jsonl")
    if args.sample:
        destination = os.path.join(_REPO, "corpus", "sample_math.jsonl")
        count = write_math(math_source, destination, limit=args.sample_docs)
        print(f"{destination}: {count} documents")
        return
    os.makedirs(args.output_dir, exist_ok=True)
    corpora = {
        "math_train": lambda dst: write_math(math_source, dst),
        "austen": lambda dst: write_austen(os.path.join(args.assets, "text", "austen.jsonl"), dst),
    }
    for name, write in corpora.items():
        jsonl = os.path.join(args.output_dir, f"{name}.jsonl")
        print(f"{jsonl}: {write(jsonl)} documents")
        if args.tokenizer_model:
            tokenize(jsonl, os.path.join(args.output_dir, name), args.tokenizer_model, args.workers)


if __name__ == "__main__":
    main()
