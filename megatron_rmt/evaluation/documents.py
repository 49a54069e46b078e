"""Held-out documents for an evaluation set, as token ids.

Two sources, told apart by what exists on disk:
- an indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`, as tools/preprocess_data.py writes):
  each document is the concatenation of its sequences, with the end-of-document token the
  preprocessor appended removed (the set never asks what follows a document);
- a JSONL file, one document per line, its text in `text_field`, tokenized here without special
  tokens, as the preprocessor does.
Bad input stops with `FILE:LINE: problem`. Blank lines are no documents and are passed over.
"""

import os

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_rmt.data import check_eod
from megatron_rmt.jsonl import InputError, records


def read_documents(
    path: str, tokenizer, text_field: str = "text", limit: int | None = None
) -> list[list[int]]:
    """The first `limit` documents (all when None) of `path` as token-id lists."""
    if IndexedDataset.exists(path):
        check_eod([path], tokenizer)  # built with the EOD the run uses (--eod-token)
        return _indexed_documents(path, tokenizer.eod, limit)
    if not os.path.isfile(path):
        raise InputError(f"{path}: neither a JSONL file nor an indexed dataset prefix")
    return _jsonl_documents(path, tokenizer, text_field, limit)


def _indexed_documents(prefix: str, eod: int, limit: int | None) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices  # sequence index where each document starts, then the end
    count = len(bounds) - 1 if limit is None else min(limit, len(bounds) - 1)
    docs = []
    for d in range(count):
        ids = [int(t) for s in range(bounds[d], bounds[d + 1]) for t in dataset[s]]
        while ids and ids[-1] == eod:
            ids.pop()
        docs.append(ids)
    return docs


def _jsonl_documents(path: str, tokenizer, text_field: str, limit: int | None) -> list[list[int]]:
    docs = []
    for number, record in records(path):
        if limit is not None and len(docs) >= limit:
            break
        if text_field not in record:
            raise InputError(f"{path}:{number}: no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{number}: {text_field!r} must be non-empty text")
        docs.append(tokenizer.encode(text))
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs
