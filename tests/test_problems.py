"""Chosen positions -> problems -> scored responses -> RL microbatches, on real GPT-2 tokens."""

import pytest
import rl_groups
import torch
from conftest import ROOT

from megatron_rmt import prompts
from megatron_rmt.config import RMTConfig
from megatron_rmt.problems import (
    Group,
    Problem,
    make_requests,
    problems_from_selection,
    score,
    think_tokens,
)
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.tokenizer import build_tokenizer

TOK = build_tokenizer(
    "GPT2BPETokenizer",
    vocab_file=f"{ROOT}/corpus/gpt2_tokenizer/vocab.json",
    merge_file=f"{ROOT}/corpus/gpt2_tokenizer/merges.txt",
)


def test_problem_prefix_is_the_document_up_to_the_position():
    tokens = torch.tensor([[5, 6, TOK.eod, 7, 8, 9]])
    batch = {
        "tokens": tokens,
        "labels": torch.tensor([[6, TOK.eod, 7, 8, 9, 4]]),
        "context_len": torch.tensor([[1, 2, 3, 1, 2, 3]]),
    }
    chosen = torch.zeros(1, 6, dtype=torch.bool)
    chosen[0, 4] = True
    (p,) = problems_from_selection(batch, chosen, torch.full((1, 6), 2.0), torch.ones(1, 6).long())
    assert p.prefix_ids == [7, 8] and p.target_id == 9 and p.continuation_ids == [9, 4]


def _scored(template_name, responses, budget):
    paris = TOK.encode(" Paris")
    problem = Problem([1, 2], paris[0], paris, 2.0, 2)
    result = RolloutResult([TOK.encode(r) for r in responses], [[0.0]] * len(responses), 0)
    template = prompts.load_template(template_name)
    return score(
        [Group(problem, None, result)], TOK, template, budget, RMTConfig(), prefix_match=False
    )


def test_answer_first_template_reads_prefix_plus_response():
    s = _scored("ntr_answer_first", [" Paris}", " London}", " Paris"], None)
    assert s.match.tolist() == [[1.0, 0.0, 0.0]]  # the third never closes its box
    assert s.unparsed.tolist() == [[False, False, True]]
    assert s.length.tolist() == [[0.0, 0.0, 0.0]]  # no budget, no length reward


def test_budget_template_scores_match_and_length():
    s = _scored("ntr_base", [" a b</think> \\boxed{Paris}", " a b c d e f"], budget=2)
    assert s.match.tolist() == [[1.0, 0.0]]
    assert s.think_tokens[0, 0] == 2 and s.length[0, 0] == 1.0  # exactly B_t thinking tokens
    assert s.rewards[0, 1] == 0.0  # unclosed think block: nothing


@pytest.mark.parametrize("cap,reward", [("fixed", 0.9), ("budget", 0.0)])
def test_correct_answer_after_a_long_think_under_each_response_cap(cap, reward):
    """B_t = 4, a 3 B_t think then the right answer: Eq. 2 gives no length reward, the match
    still counts (1 - w) with the paper's fixed cap; the 2 B_t + answer cap cuts it first."""
    paris = TOK.encode(" Paris")
    problem = Problem(TOK.encode("The capital of France is"), paris[0], paris, 2.0, 2)
    rmt = RMTConfig(answer_tokens=4, max_response_tokens=64, response_cap=cap, group_size=2)
    template = prompts.load_template("ntr_base")
    (req,) = make_requests([problem], TOK, template, 4, rmt, seed=0)
    response = TOK.encode(" x" * 12 + "</think> \\boxed{Paris}")  # 12 = 3 B_t think tokens
    sampled = [response[: req.max_tokens]] * req.n  # an engine honours max_tokens
    result = RolloutResult(sampled, [[0.0] * len(sampled[0])] * req.n, 0)
    s = score([Group(problem, None, result)], TOK, template, 4, rmt, prefix_match=False)
    assert req.max_tokens == (64 if cap == "fixed" else 2 * 4 + 4)
    assert s.rewards.tolist() == [[pytest.approx(reward)] * 2]
    assert s.length.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("fold,match", [(False, 0.0), (True, 1.0)])
def test_match_fold_case_reaches_the_reward(fold, match):
    paris = TOK.encode(" Paris")
    problem = Problem([1, 2], paris[0], paris, 2.0, 2)
    result = RolloutResult([TOK.encode(" a</think> \\boxed{paris}")], [[0.0]], 0)
    template = prompts.load_template("ntr_base")
    rmt = RMTConfig(match_fold_case=fold)
    s = score([Group(problem, None, result)], TOK, template, None, rmt, prefix_match=False)
    assert s.match.tolist() == [[match]]


def _one_token_each(text):
    return [TOK.encode(c)[0] for c in text]  # a valid sampling, not the tokenizer's own split


def test_think_length_is_the_sampled_count_not_a_retokenisation():
    think = _one_token_each(" hello world")  # 12 sampled ids; re-encoded, " hello world" is 2
    tag = _one_token_each("</think>")  # the tag spelt by 8 tokens
    ids = think + tag + TOK.encode(" \\boxed{Paris}")
    assert len(TOK.encode(TOK.decode(think))) == 2
    assert think_tokens(TOK, ids, "\n<think>\n") == 12
    result = RolloutResult([ids], [[0.0] * len(ids)], 0)
    paris = TOK.encode(" Paris")
    problem = Problem([1, 2], paris[0], paris, 2.0, 2)
    template = prompts.load_template("ntr_base")
    s = score([Group(problem, None, result)], TOK, template, 12, RMTConfig(), prefix_match=False)
    assert s.think_tokens.tolist() == [[12.0]] and s.length.tolist() == [[1.0]]  # l = B_t


def test_think_length_edge_cases():
    ids = TOK.encode(" a b.</think> x</think> \\boxed{y}")
    last = TOK.decode(ids).rfind("</think>")
    expected = next(i for i in range(len(ids)) if len(TOK.decode(ids[: i + 1])) > last)
    assert think_tokens(TOK, ids, "<think>") == expected  # the last tag counts
    assert think_tokens(TOK, TOK.encode(" a b c"), "<think>") == 3  # never closed: all
    assert think_tokens(TOK, TOK.encode(" Paris}"), "<think></think>\\boxed{") == 0
    split = TOK.encode("漢")  # three byte-level tokens for one character
    assert len(split) == 3 and think_tokens(TOK, split + TOK.encode("</think>"), "") == 3


def test_rl_microbatch_masks_exactly_the_response_labels():
    req = RolloutRequest([10, 11, 12], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    res = RolloutResult([[20, 21], [22]], [[-0.5, -0.6], [-0.7]], 0)
    (mb,) = rl_groups.rows([req], [res], torch.tensor([[1.0, -1.0]]), pad_id=0)
    assert mb.tokens.tolist() == [[10, 11, 12, 20], [10, 11, 12, 22]]
    assert mb.labels.tolist() == [[11, 12, 20, 21], [11, 12, 22, 0]]
    assert mb.resp_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert torch.allclose(mb.old_logp[0, 2:], torch.tensor([-0.5, -0.6]))
