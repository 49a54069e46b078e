"""Test-session wiring: the `gpu` marker skips itself on CPU-only machines."""

import os
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = [
    "--tokenizer-type",
    "GPT2BPETokenizer",
    "--vocab-file",
    f"{ROOT}/corpus/gpt2_tokenizer/vocab.json",
    "--merge-file",
    f"{ROOT}/corpus/gpt2_tokenizer/merges.txt",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """The bundled MATH sample as Megatron indexed shards (GPT-2 tokens); returns the prefix."""
    sys.path.insert(0, f"{ROOT}/tools")
    import preprocess_data

    out = tmp_path_factory.mktemp("corpus") / "sample"
    preprocess_data.main(
        [
            "--input",
            f"{ROOT}/corpus/sample_math.jsonl",
            "--output-prefix",
            str(out),
            "--append-eod",
            *GPT2,
        ]
    )
    return f"{out}_text_document"
