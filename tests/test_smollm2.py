"""The real SmolLM2-135M-Instruct GGUF becomes a Megatron checkpoint that computes what transformers
computes from the same file, and continues "The capital of France is" with " Paris".

The asset lives outside the project (`../shared/assets`, present on CI); without it the test skips
(fails under MEGATRON_RMT_REQUIRE_ALL=1, see conftest.missing).
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import missing
from distributed import spawn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import convert_hf_to_megatron as to_megatron  # noqa: E402
import convert_megatron_to_hf as to_hf  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GGUF = os.path.normpath(
    os.path.join(ROOT, "..", "shared", "assets", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind.",
    "Elizabeth Bennet walked to Netherfield through the muddy fields.",
    "If 3x + 5 = 20, then x = 5, because 3 times 5 is 15.",
    "The derivative of x^2 + 2x with respect to x is 2x + 2.",
]
PROMPT, NEW_TOKENS = "The capital of France is", 4


@pytest.fixture(scope="module", autouse=True)
def _gguf_present():
    if not os.path.isfile(GGUF):
        missing(f"the SmolLM2 GGUF asset {GGUF}", "check out ../shared beside the project")


def convert_and_run(ckpt: str):
    """Convert the GGUF at TP1, reload it, and return (token ids, logits, greedy continuation)."""
    from transformers import AutoTokenizer

    source = to_megatron.open_source(GGUF)
    to_megatron.convert(source, ckpt, to_megatron.prepare(source, ckpt, 1, 1, 1))
    model, _ = to_hf.load_model(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # the tokenizer the converter wrote
    ids = [tokenizer(s, return_tensors="pt").input_ids for s in SENTENCES]
    with torch.no_grad():
        logits = [_logits(model, i) for i in ids]
        prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
        for _ in range(NEW_TOKENS):  # greedy, recomputing the prefix: 4 tokens, no cache needed
            next_id = _logits(model, prompt)[:, -1].argmax(-1, keepdim=True)
            prompt = torch.cat([prompt, next_id], dim=1)
    return ids, logits, tokenizer.decode(prompt[0, -NEW_TOKENS:])


def _logits(model, ids):
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    return model(ids, positions, None)  # [1, s, v]; train mode, dropout 0 (eval asserts on CPU)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(worker's results, transformers' model of the same GGUF), built side by side: the worker
    process converts while this one loads the reference."""
    from transformers import AutoModelForCausalLM

    ckpt = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(spawn, convert_and_run, 1, args=(ckpt,))
        folder, name = os.path.split(GGUF)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return job.result()[0], hf.eval()


def test_logits_match_transformers_gguf_loader(converted):
    (ids, logits, _), hf = converted
    with torch.no_grad():
        for i, got in zip(ids, logits, strict=True):
            want = hf(i).logits  # [1, s, v]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_continuation_names_paris(converted):
    continuation = converted[0][2]
    assert continuation.startswith(" Paris"), continuation
