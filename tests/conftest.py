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


# The second Megatron-Core line (`make test-mc019`: Python 3.12, megatron-core 0.19, running
# `pytest -m mcore`) runs the tests that exercise megatron-core's APIs, chosen to fit CI's budget:
# file -> test functions (all their parameters), or None for the whole file. New tests of that
# kind may carry `@pytest.mark.mcore` themselves instead. A name listed here that its file does
# not define stops the session, so a renamed test cannot silently leave the line.
MCORE_LINE = {
    "test_mcore_versions.py": None,  # checkpoint format of the installed release; compat layer
    "test_platform.py": None,  # the CPU compatibility layer over this release's torch.cuda use
    # model, schedules, DDP, optimizer, dist_checkpointing resharding: TP 2, PP 2, TP 2 x PP 2
    "test_parallel_step.py": ["test_same_losses_as_tp1pp1"],
    # the trainer end to end: datasets, resume, the embedded engine (static inference context)
    "test_train.py": [
        "test_resume_continues_exactly",
        "test_embedded_engine_logprobs_match_the_trainer",
    ],
    "test_data.py": ["test_microbatch_fields", "test_resume_continues_with_next_unseen_sample"],
    "test_convert.py": ["test_logits_match_transformers", "test_round_trip_is_bit_exact"],
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mcore: also runs on the megatron-core 0.19 line (tests/conftest.py MCORE_LINE)"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by markers
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        name = getattr(item, "originalname", item.name)
        wanted = MCORE_LINE.get(item.path.name, ())
        if wanted is None or name in (wanted or ()):
            item.add_marker(pytest.mark.mcore)
        if item.path.name in MCORE_LINE and getattr(item, "module", None) is not None:
            modules[item.path.name] = item.module
    for file, module in modules.items():
        lost = [name for name in MCORE_LINE[file] or () if not hasattr(module, name)]
        if lost:
            raise pytest.UsageError(f"tests/conftest.py MCORE_LINE names {lost}, not in {file}")
