"""Tokenize JSONL documents into Megatron's indexed format (.bin/.idx), flag-compatible with
Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input corpus/sample_math.jsonl --output-prefix data/math \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ../shared/assets/tokenizers/qwen3 \
        --append-eod --workers 2

writes data/math_text_document.bin/.idx (`_sentence` with --split-sentences), one file pair per
--json-keys entry, through megatron.core's IndexedDatasetBuilder, so Megatron-LM reads them too.

Deliberate choices:
- Every line is checked: malformed JSON, a missing key, a non-string value, invalid UTF-8 and an
  empty (blank) document each stop the run with `FILE:LINE: problem`; --skip-bad-lines skips
  them instead (the whole line, so all keys' outputs stay aligned) and reports them at the end.
  Blank lines are not documents and are passed over silently; an input without a single
  document is an error (an empty .bin/.idx pair would only fail later, in training).
- Output is written under temporary names and renamed into place only after every input line
  was handled, the .bin before the .idx (an old .idx is removed first): an error, Ctrl-C or a
  crash never leaves a .bin/.idx pair that looks valid but is not.
- --append-eod appends `<|endoftext|>` (the pretraining document separator) where the
  vocabulary has it; Megatron-LM's tool appends the tokenizer's eos_token (Qwen3: `<|im_end|>`),
  which `--eod-token eos` reproduces. The trainer's --eod-token must name the same one.
- --workers N > 1 tokenizes in N forked processes over chunks of lines, read back in input
  order, so the output does not depend on N; --workers 1 runs in-process (no IPC at all).
  Workers ignore SIGINT: the parent alone handles Ctrl-C and stops them. Python raises the
  KeyboardInterrupt wherever the main thread is when it handles the signal, and some places
  swallow it (an at-fork hook inside the pool's start: the signal mask covers the main thread
  only, so a tokenizer thread can take the signal for it); the parent also remembers the signal
  and checks between chunks and before the commit, so a Ctrl-C is never lost. Started with
  SIGINT ignored (a background job of a script), it keeps ignoring it, as Python does.
"""

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_rmt.tokenizer import build_tokenizer

_CHUNK_LINES = 128  # lines per task sent to a worker: amortises IPC, keeps memory flat
_MAX_REPORTED = 10  # bad lines listed in the final report when they are skipped


class BadInputError(Exception):
    """A bad input line, with its file and line number in the message."""


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bad_lines: int = 0
    seconds: float = 0.0
    bad_examples: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # the finished .bin paths


def get_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file (.gz too), a directory or a glob")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    g.add_argument("--split-sentences", action="store_true", help="split with NLTK punkt")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences")
    g.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines")
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer-type", required=True, choices=["HuggingFaceTokenizer", "GPT2BPETokenizer"]
    )
    g.add_argument("--tokenizer-model", help="directory with tokenizer.json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--append-eod", action="store_true", help="append EOD after each document")
    g.add_argument(
        "--eod-token",
        choices=["endoftext", "eos"],
        default="endoftext",
        help="EOD: <|endoftext|> (default) or the eos_token, as Megatron-LM's tool appends; "
        "train with the same --eod-token",
    )
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between updates")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.keep_newlines and not args.split_sentences:
        p.error("--keep-newlines only applies with --split-sentences")
    return args


def input_files(spec: str) -> list[str]:
    """The files behind --input: one file, every .json/.jsonl(.gz) in a directory, or a glob."""
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        paths = [os.path.join(spec, n) for n in names if n.endswith((".json", ".jsonl", ".gz"))]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
        raise BadInputError(f"no input files match {spec!r}")
    return paths


def read_chunks(paths: list[str]):
    """Yield (path, [(line_number, raw_bytes), ...]) in input order; chunks never span files."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            chunk = []
            for number, raw in enumerate(f, start=1):
                chunk.append((number, raw))
                if len(chunk) == _CHUNK_LINES:
                    yield path, chunk
                    chunk = []
            if chunk:
                yield path, chunk


class DocumentEncoder:
    """Turns one raw JSONL line into token arrays per key (or names what is wrong with it)."""

    def __init__(self, args: argparse.Namespace):
        self.keys = args.json_keys
        self.append_eod = args.append_eod
        self.tokenizer = build_tokenizer(
            args.tokenizer_type,
            args.tokenizer_model,
            args.vocab_file,
            args.merge_file,
            args.eod_token,
        )
        self.dtype = DType.optimal_dtype(self.tokenizer.vocab_size)
        self.splitter = (
            sentence_splitter(args.lang, args.keep_newlines) if args.split_sentences else None
        )

    def encode_line(self, raw: bytes):
        """Return None for a blank line, a problem string for a bad one, else a list (one entry
        per key) of (tokens [n] array, lengths of its sentences)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"invalid UTF-8 at byte {e.start}"
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"malformed JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        encoded = []
        for key in self.keys:
            if key not in record:
                return f"missing key {key!r}"
            text = record[key]
            if not isinstance(text, str):
                return f"key {key!r} holds a {type(text).__name__}, expected a string"
            if not text.strip():
                return f"empty document in key {key!r}"
            encoded.append(self._encode_text(text))
        return encoded

    def _encode_text(self, text: str) -> tuple[np.ndarray, list[int]]:
        pieces = self.splitter(text) if self.splitter else [text]
        ids, lengths = [], []
        for piece in pieces:
            piece_ids = self.tokenizer.encode(piece)
            if piece_ids:
                ids.extend(piece_ids)
                lengths.append(len(piece_ids))
        if self.append_eod:
            ids.append(self.tokenizer.eod)
            if lengths:
                lengths[-1] += 1
            else:
                lengths.append(1)
        return np.asarray(ids, dtype=self.dtype), lengths


def sentence_splitter(lang: str, keep_newlines: bool):
    """NLTK punkt sentence splitter. With keep_newlines, sentences keep the whitespace (and
    newlines) that follows them, so the sentences concatenate back to the document."""
    from nltk.tokenize.punkt import PunktTokenizer

    try:
        punkt = PunktTokenizer(lang)
    except LookupError:
        raise BadInputError(
            f"--split-sentences needs NLTK's punkt_tab data for {lang!r}, which is not installed. "
            "Install it with `python -m nltk.downloader punkt_tab`, or point NLTK_DATA at a "
            "folder holding tokenizers/punkt_tab (offline: ../shared/assets/nltk_data)."
        ) from None
    if not keep_newlines:
        return punkt.tokenize

    def split_keeping_whitespace(text: str) -> list[str]:
        starts = [start for start, _ in punkt.span_tokenize(text)]
        if not starts:
            return [text]
        bounds = [0, *starts[1:], len(text)]
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    return split_keeping_whitespace


_ENCODER = None  # the DocumentEncoder in use; forked workers inherit the parent's


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_SIGINT_SEEN = threading.Event()


def _on_sigint(signum, frame) -> None:
    _SIGINT_SEEN.set()
    raise KeyboardInterrupt


def _stop_if_interrupted() -> None:
    """A Ctrl-C whose KeyboardInterrupt was swallowed where it was raised."""
    if _SIGINT_SEEN.is_set():
        raise KeyboardInterrupt


def _encode_chunk(task):
    """[(line_number, bytes of the line, encode_line result)] for one chunk of one file."""
    path, lines = task
    return path, [(number, len(raw), _ENCODER.encode_line(raw)) for number, raw in lines]


class ShardWriter:
    """One IndexedDatasetBuilder per key, writing under temporary names until commit()."""

    def __init__(self, output_prefix: str, keys: list[str], level: str, dtype: type):
        self.finals = [f"{output_prefix}_{key}_{level}" for key in keys]
        self.temps = [f"{final}.tmp{os.getpid()}" for final in self.finals]
        self.builders = []
        try:
            for temp in self.temps:
                self.builders.append(IndexedDatasetBuilder(temp + ".bin", dtype=dtype))
        except BaseException:
            self.abort()
            raise

    def add(self, encoded: list[tuple[np.ndarray, list[int]]]) -> None:
        for builder, (ids, lengths) in zip(self.builders, encoded, strict=True):
            builder.add_document(ids, lengths)

    def commit(self) -> list[str]:
        for builder, temp in zip(self.builders, self.temps, strict=True):
            builder.finalize(temp + ".idx")
        for temp, final in zip(self.temps, self.finals, strict=True):
            # Drop a stale .idx first so no moment pairs the new .bin with an old index.
            if os.path.exists(final + ".idx"):
                os.remove(final + ".idx")
            os.replace(temp + ".bin", final + ".bin")
            os.replace(temp + ".idx", final + ".idx")
        return [final + ".bin" for final in self.finals]

    def abort(self) -> None:
        for builder in self.builders:
            builder.data_file.close()
        for temp in self.temps:
            for suffix in (".bin", ".idx"):
                if os.path.exists(temp + suffix):
                    os.remove(temp + suffix)


def preprocess(args: argparse.Namespace) -> Stats:
    paths = input_files(args.input)
    encoder = DocumentEncoder(args)  # also validates tokenizer and punkt data before any work
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    level = "sentence" if args.split_sentences else "document"
    writer = ShardWriter(args.output_prefix, args.json_keys, level, encoder.dtype)

    global _ENCODER
    _ENCODER = encoder
    pool = None
    _SIGINT_SEEN.clear()
    # Not where Ctrl-C is ignored (a background job of a script): that stays as it is.
    previous = signal.getsignal(signal.SIGINT)
    remember = threading.current_thread() is threading.main_thread() and callable(previous)
    if remember:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        if args.workers == 1:
            results = map(_encode_chunk, read_chunks(paths))
        else:
            # fork: workers start at once with the loaded tokenizer instead of re-reading it.
            # A Ctrl-C landing inside fork() is raised in an at-fork hook, where Python swallows
            # it, so SIGINT is held back while forking and delivered just after. The pool's
            # threads inherit the mask, which leaves SIGINT to the main thread.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pool = multiprocessing.get_context("fork").Pool(args.workers, _ignore_sigint)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            results = pool.imap(_encode_chunk, read_chunks(paths))
        gz = any(p.endswith(".gz") for p in paths)  # compressed sizes say nothing of progress
        total = None if gz else sum(map(os.path.getsize, paths))
        stats = _write_all(results, writer, total, args.skip_bad_lines, args.log_interval)
        if stats.documents == 0:
            why = f"all {stats.bad_lines} bad and skipped" if stats.bad_lines else "all blank"
            raise BadInputError(f"{args.input}: no documents in the input (its lines: {why})")
        _stop_if_interrupted()
        stats.outputs = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if remember:
            signal.signal(signal.SIGINT, previous)
        _ENCODER = None
        if pool is not None:
            pool.terminate()
            pool.join()
    _report(stats)
    return stats


def _write_all(results, writer: ShardWriter, total, skip_bad_lines: bool, log_interval: int):
    """Feed encoded chunks, in input order, to the writer; count what was done."""
    stats = Stats()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
    start, next_log = time.perf_counter(), log_interval
    with bar:
        for path, chunk in results:
            _stop_if_interrupted()
            for number, nbytes, outcome in chunk:
                stats.bytes += nbytes
                if outcome is None:
                    continue
                if isinstance(outcome, str):
                    message = f"{path}:{number}: {outcome}"
                    if not skip_bad_lines:
                        raise BadInputError(message)
                    stats.bad_lines += 1
                    if len(stats.bad_examples) < _MAX_REPORTED:
                        stats.bad_examples.append(message)
                    continue
                writer.add(outcome)
                stats.documents += 1
                stats.tokens += sum(len(ids) for ids, _ in outcome)
            bar.update(sum(nbytes for _, nbytes, _ in chunk))
            if stats.documents >= next_log:
                next_log = stats.documents + log_interval
                elapsed = time.perf_counter() - start
                rates = (
                    f"{stats.documents / elapsed:.0f} docs/s, {stats.tokens / elapsed:.0f} tok/s"
                )
                bar.set_postfix_str(rates)
    stats.seconds = time.perf_counter() - start
    return stats


def _report(stats: Stats) -> None:
    elapsed = stats.seconds
    print(
        f"done: {stats.documents} documents, {stats.tokens} tokens in {elapsed:.1f} s "
        f"({stats.documents / elapsed:.0f} docs/s, {stats.tokens / elapsed:.0f} tok/s, "
        f"{stats.bytes / elapsed / 1e6:.1f} MB/s) -> {', '.join(stats.outputs)}",
        file=sys.stderr,
    )
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines} bad lines, first ones:", file=sys.stderr)
        for message in stats.bad_examples:
            print(f"  {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> Stats:
    return preprocess(get_args(argv))


if __name__ == "__main__":
    try:
        main()
    except BadInputError as e:
        sys.exit(f"error: {e}; no output written")
    except KeyboardInterrupt:
        sys.exit("interrupted: no output written")
