"""Match, prefix, composite and math rewards against hand-written cases."""

import pytest

from megatron_rmt.rewards import (
    RewardParts,
    composite,
    match_reward,
    math_answer_reward,
    math_answers_equal,
    next_token_reward,
    prefix_reward,
    rpt_reward,
)


def test_match_reward_normalisation():
    assert match_reward(" Paris", " Paris") == 1.0
    assert match_reward("Paris", " Paris") == 1.0  # surrounding whitespace ignored
    assert match_reward("paris", " Paris") == 0.0  # case-sensitive by default
    assert match_reward("paris", " Paris", fold_case=True) == 1.0
    assert match_reward("Pari", " Paris") == 0.0
    assert match_reward(None, " Paris") == 0.0
    assert match_reward("", "\n") == 1.0  # whitespace-only target: only an empty box


def test_prefix_reward_needs_a_token_boundary():
    tokens = [" New", " York", " City"]
    assert prefix_reward("New", tokens) == 1.0
    assert prefix_reward("New York", tokens) == 1.0
    assert prefix_reward(" New York City ", tokens) == 1.0
    assert prefix_reward("New Yo", tokens) == 0.0  # inside a token
    assert prefix_reward("York", tokens) == 0.0  # not a prefix
    assert prefix_reward("New York City Hall", tokens) == 0.0  # beyond the continuation
    assert prefix_reward(None, tokens) == 0.0


def test_prefix_reward_on_bytes_split_characters():
    # "é" is two UTF-8 bytes; byte-level BPE may give each its own token.
    tokens = [b" caf", b"\xc3", b"\xa9", b" noir"]
    assert prefix_reward("café", tokens) == 1.0
    assert prefix_reward("café noir", tokens) == 1.0
    assert prefix_reward("caf", tokens) == 1.0


def test_composite_eq5():
    assert composite(1.0, 0.0, 0.1) == pytest.approx(0.9)
    assert composite(0.0, 1.0, 0.1) == pytest.approx(0.1)
    assert composite(1.0, 0.5, 0.2) == pytest.approx(0.9)


def test_next_token_reward_components():
    good = "<think>" + "x " * 10 + "</think>\\boxed{ Paris}"
    assert next_token_reward(good, " Paris", 10, 10) == RewardParts(1.0, 1.0, 1.0, True)
    wrong = next_token_reward("<think>..</think>\\boxed{Rome}", " Paris", 5, 10)
    assert wrong == RewardParts(pytest.approx(0.05), 0.0, 0.5, True)
    unclosed = next_token_reward("<think>" + "x " * 50, " Paris", 10, 10)
    assert unclosed == RewardParts(0.0, 0.0, 0.0, False)  # no format, no length reward
    no_box = next_token_reward("<think>a</think> Paris", " Paris", 10, 10)
    assert no_box == RewardParts(0.0, 0.0, 0.0, False)  # unreadable: no length reward either
    no_budget = next_token_reward(good, " Paris", 10, None)  # the "without DTB" ablation
    assert no_budget == RewardParts(1.0, 1.0, 0.0, True)


def test_rpt_reward():
    assert rpt_reward("</think>\\boxed{New York}", [" New", " York"]).total == 1.0
    assert rpt_reward("</think>\\boxed{New Y}", [" New", " York"]).total == 0.0


@pytest.mark.parametrize(
    "prediction,gold",
    [
        ("1,000", "1000"),
        ("5.0", "5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("2/4", "\\frac{1}{2}"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{-3}{4}", "-3/4"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("$12$", "12"),
        ("76^\\circ", "76"),
        ("76^{\\circ}", "76^\\circ"),
        ("\\text{(B)}", "(B)"),
        ("10\\%", "10"),
        ("x = 5", "5"),
        ("2 \\sqrt{5}", "2\\sqrt{5}"),
        ("\\frac{\\sqrt{3}}{3}", "\\dfrac{\\sqrt{3}}{3}"),
        ("3\\!000", "3000"),
    ],
)
def test_math_answers_equal(prediction, gold):
    assert math_answers_equal(prediction, gold)


@pytest.mark.parametrize(
    "prediction,gold",
    [
        ("0.33", "\\frac{1}{3}"),
        ("-2,1", "-21"),  # a list of answers is not a thousands separator
        ("2\\sqrt{5}", "2\\sqrt{3}"),
        ("1/0", "0"),
        ("12", "13"),
    ],
)
def test_math_answers_differ(prediction, gold):
    assert not math_answers_equal(prediction, gold)


def test_math_answer_reward_reads_the_last_box_after_think():
    assert math_answer_reward("<think>\\boxed{3}</think>so \\boxed{\\frac{1}{2}}", "0.5").total == 1
    assert math_answer_reward("<think>so \\boxed{0.5}", "0.5") == RewardParts(0.0, 0.0, 0.0, False)
    assert math_answer_reward("</think>answer: 0.5", "0.5").parsed is False
