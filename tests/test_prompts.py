"""Templates, prompt ids with the real Qwen3 tokenizer, and the response parser's edge cases."""

from pathlib import Path

import pytest
from conftest import missing

from megatron_rmt.prompts import (
    build_prompt_ids,
    extract_prediction,
    last_boxed,
    load_template,
    render_user,
    split_response,
)

QWEN3 = Path(__file__).resolve().parents[1] / "../shared/assets/tokenizers/qwen3"


@pytest.fixture(scope="module")
def qwen3():
    if not QWEN3.exists():
        missing(f"the Qwen3 tokenizer {QWEN3}", "check out ../shared beside the project")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3)


def test_ntr_instruction_has_the_paper_wording_and_the_budget():
    user = render_user(load_template("ntr_base"), "Cost: $5 {x}", 37)
    assert user.startswith(
        "Complete the given text by predicting the next token, list multiple potential tokens "
        "and select the most probable one as the final prediction."
    )
    assert "exactly 37 tokens" in user and "<think></think>" in user
    assert "\\boxed{token} after </think>" in user
    assert user.endswith("The text is: Cost: $5 {x}")  # text inserted literally


def test_budget_sentence_only_with_a_budget_and_math_needs_none():
    free = render_user(load_template("ntr_chat"), "abc", None)
    assert "Reason inside <think></think>, then write" in free and "exactly" not in free
    assert "Use exactly 5 tokens" in render_user(load_template("ntr_chat"), "abc", 5)
    assert render_user(load_template("math_chat"), "1+1?", None).endswith("Problem: 1+1?")
    with pytest.raises(FileNotFoundError):
        load_template("no_such_template")


def test_base_prompt_ids_with_qwen3(qwen3):
    prefix_ids = qwen3.encode("The capital of France is")
    ids = build_prompt_ids(qwen3, load_template("ntr_base"), prefix_ids, 64)
    text = qwen3.decode(ids)
    assert "exactly 64 tokens" in text
    assert text.endswith("The text is: The capital of France is\n<think>\n")
    assert ids[-2:] == [qwen3.convert_tokens_to_ids("<think>"), qwen3.encode("\n")[0]]


def test_text_last_prompt_ends_with_the_text_inside_the_think(qwen3):
    # The first response token must follow the text itself (its own next token), not markup.
    prefix_ids = qwen3.encode("The capital of France is")
    ids = build_prompt_ids(qwen3, load_template("ntr_text_last"), prefix_ids, 6)
    text = qwen3.decode(ids)
    assert "exactly 6 tokens" in text
    assert text.endswith("\n<think>\nThe text is: The capital of France is")
    assert ids[-4:] == prefix_ids[-4:]  # the text's own last tokens end the prompt (its first
    # token merges with the space before it)
    assert text.count("<think>") == 2  # the instruction's "<think></think>" and the opened block


def test_chat_prompt_ids_with_qwen3(qwen3):
    prefix_ids = qwen3.encode("Once upon a")
    ids = build_prompt_ids(qwen3, load_template("ntr_chat"), prefix_ids, 8)
    text = qwen3.decode(ids)
    assert text.startswith("<|im_start|>user\nComplete the given text")
    assert text.endswith("The text is: Once upon a<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_split_response():
    assert split_response("<think>a b</think> \\boxed{c}") == ("a b", " \\boxed{c}")
    assert split_response("a b</think>x") == ("a b", "x")  # prompt already opened <think>
    assert split_response("<think>never closed") == ("never closed", None)
    assert split_response("x</think>y</think>z") == ("x</think>y", "z")


@pytest.mark.parametrize(
    "response,expected",
    [
        ("<think>hmm</think>\\boxed{ Paris}", " Paris"),
        ("<think>\\boxed{no}</think>The answer is \\boxed{yes}.", "yes"),  # box in thinking ignored
        ("</think>\\boxed{a} then \\boxed{b}", "b"),  # several answers: the last
        ("</think>\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("</think>\\boxed {x}", "x"),
        ("</think>\\boxed{\\}}", "\\}"),  # an escaped brace does not close the box
        ("</think>\\boxed{}", ""),
        ("<think>thinking \\boxed{x} forever", None),  # think block never closes
        ("</think>no box here", None),
        ("</think>\\boxed{a} \\boxed{unclosed", None),  # the last box is broken
        ("\\boxed{x}", None),  # no think block at all
    ],
)
def test_extract_prediction(response, expected):
    assert extract_prediction(response) == expected


def test_last_boxed_without_think():
    assert last_boxed("so \\boxed{1} or \\boxed{2}") == "2"
    assert last_boxed("nothing") is None
