"""Test-session wiring: one rule for missing prerequisites (`missing`), the `gpu` marker, and the
bundled corpus as Megatron shards.

A test whose prerequisite (vLLM, an asset, a tool) is absent skips, saying what is missing and how
to provide it, except where MEGATRON_RMT_REQUIRE_ALL=1 (the Makefile's `test` target, hence CI):
there it fails, so a CI run without vLLM or the assets cannot stay green by skipping them.
"""

import importlib
import os
import sys
from typing import NoReturn

import pytest
import torch

REQUIRE_ALL = "MEGATRON_RMT_REQUIRE_ALL"


def missing(what: str, how: str, *, ci_has_it: bool = True) -> NoReturn:
    """End the calling test because `what` is absent: fail when the environment requires every
    prerequisite and CI has this one, skip otherwise. Every skip in tests/ goes through here."""
    if ci_has_it and os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{what} is missing ({REQUIRE_ALL}=1 requires it): {how}", pytrace=False)
    note = f"; with {REQUIRE_ALL}=1 (as in `make test`) this fails" if ci_has_it else ""
    pytest.skip(f"{what} is missing: {how}{note}")


def require_module(name: str, how: str):
    """The imported module `name`, or `missing` when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module {name}", how)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        missing("a CUDA GPU", "run on a GPU machine (CI has none)", ci_has_it=False)


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
