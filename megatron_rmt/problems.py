"""Next-token-reasoning problems: from chosen positions to rollout requests, from responses to
rewards; one `Group` record carries each chosen position from selection to the RL batch
(rl_batch.py builds the microbatches from the groups).

A chosen position j of a window asks: given the document prefix up to and including token j,
what is token j+1 (the label at j)? The prompt holds that prefix (as text, see prompts.py) with
the budget sentence; each of the G responses is scored by its final prediction (exact token
match, or RPT's byte-prefix match) and, with the dynamic budget, by its reasoning length.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rmt import budget as budget_mod
from megatron_rmt import prompts, rewards
from megatron_rmt.parallel import mix_seed
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult

CONTINUATION_TOKENS = 8  # true tokens kept after the target, for RPT's prefix reward


@dataclass(frozen=True)
class Problem:
    prefix_ids: list[int]  # the document up to and including position j
    target_id: int  # token j+1
    continuation_ids: list[int]  # tokens j+1, j+2, ... within the window
    entropy: float  # predictive entropy at j (nats)
    level: int  # 0 easy, 1 medium, 2 hard (NOT_CANDIDATE: an RPT position below tau_easy)


@dataclass(frozen=True)
class Group:
    """One chosen position (or post-training's math problem) from selection to the RL batch:
    the problem, its rollout request, the engine's result and the G responses' advantages."""

    problem: Any  # Problem, or math_data.MathProblem in post-training
    request: RolloutRequest
    result: RolloutResult
    advantages: torch.Tensor | None = None  # [G], once scored


def served(chosen: list, requests: list[RolloutRequest], results: list | None) -> list[Group]:
    """The groups of the requests that have a result (`results` as dispatch.StepRollouts gives
    them: None for a request that failed, or None if all did)."""
    if results is None:
        return []
    triples = zip(chosen, requests, results, strict=True)
    return [Group(p, q, r) for p, q, r in triples if r is not None]


def with_advantages(groups: list[Group], adv: torch.Tensor) -> list[Group]:
    """`adv` [n, G] (grpo.group_advantages of the groups' rewards), one row per group."""
    return [dataclasses.replace(g, advantages=adv[i]) for i, g in enumerate(groups)]


@dataclass(frozen=True)
class Scored:
    rewards: torch.Tensor  # [n, G] composite reward
    match: torch.Tensor  # [n, G] r_match (or RPT's prefix reward)
    length: torch.Tensor  # [n, G] r_len
    think_tokens: torch.Tensor  # [n, G] reasoning length in tokens
    response_tokens: torch.Tensor  # [n, G]
    unparsed: torch.Tensor  # [n, G] bool: no prediction could be read


def problems_from_selection(
    batch: dict, chosen: torch.Tensor, entropy: torch.Tensor, levels: torch.Tensor
) -> list[Problem]:
    """chosen, entropy, levels: [b, s]; batch holds tokens, labels, context_len [b, s]."""
    out = []
    for b, j in chosen.nonzero().tolist():
        start = j + 1 - int(batch["context_len"][b, j])
        out.append(
            Problem(
                prefix_ids=batch["tokens"][b, start : j + 1].tolist(),
                target_id=int(batch["labels"][b, j]),
                continuation_ids=batch["labels"][b, j : j + CONTINUATION_TOKENS].tolist(),
                entropy=float(entropy[b, j]),
                level=int(levels[b, j]),
            )
        )
    return out


def make_requests(
    problems: list[Problem], tokenizer, template, budget: int | None, rmt, seed: int, first: int = 0
) -> list[RolloutRequest]:
    """One request of G samples per problem; `budget` None leaves the budget sentence out.
    `first` is the index of problems[0] in the step: the sampling seed follows the index, so a
    step's requests are the same whether built at once or a microbatch at a time."""
    prompt_ids = [
        prompts.build_prompt_ids(tokenizer, template, p.prefix_ids, budget) for p in problems
    ]
    return sample_requests(prompt_ids, response_cap(rmt, budget), rmt, seed, first)


def response_cap(rmt, budget: int | None) -> int:
    """Most tokens a response may have (training and evaluation alike). `fixed` (default, the
    paper's): max_response_tokens, so a correct answer after a think longer than 2 B_t still
    earns (1 - w) r_match, only its length reward is 0. `budget`: also at most 2 B_t +
    answer_tokens, which bounds sampling cost as B_t decays but truncates such an answer
    before `</think>` (it scores 0). Without a budget both are max_response_tokens."""
    if rmt.response_cap == "budget" and budget is not None:
        return min(rmt.max_response_tokens, budget_mod.max_new_tokens(budget, rmt.answer_tokens))
    return rmt.max_response_tokens


def sample_requests(
    prompt_ids: list[list[int]], max_tokens: int, rmt, seed: int, first: int = 0
) -> list[RolloutRequest]:
    """One request of G samples per prompt at the configured temperature and top-p, seeded by
    the step's `seed` and the prompt's index (`first` is that of prompt_ids[0])."""
    return [
        RolloutRequest(
            prompt_ids=ids,
            n=rmt.group_size,
            max_tokens=max_tokens,
            temperature=rmt.rollout_temperature,
            top_p=rmt.rollout_top_p,
            seed=mix_seed(seed, i),
        )
        for i, ids in enumerate(prompt_ids, start=first)
    ]


def score(
    groups: list[Group],
    tokenizer,
    template,
    budget: int | None,
    rmt,
    prefix_match: bool,
) -> Scored:
    """Next-token rewards of every response. prefix_match: RPT's byte-prefix reward instead of
    exact match; budget None: no length reward (r = r_match)."""
    targets = [tokenizer.token_text(g.problem.target_id) for g in groups]
    continuations = [[tokenizer.token_text(t) for t in g.problem.continuation_ids] for g in groups]

    def reward(i: int, text: str, think: int) -> rewards.RewardParts:
        if prefix_match:
            return rewards.rpt_reward(text, continuations[i])
        w, r_max, fold = rmt.length_reward_weight, rmt.length_reward_max, rmt.match_fold_case
        return rewards.next_token_reward(
            text, targets[i], think, budget, w=w, r_max=r_max, fold_case=fold
        )

    return score_responses(groups, tokenizer, template, reward)


def score_responses(
    groups: list[Group],
    tokenizer,
    template,
    reward: Callable[[int, str, int], rewards.RewardParts],
) -> Scored:
    """Score every response of every group with `reward(group index, text, thinking tokens)`,
    where text is the template's response prefix + the sampled text and thinking tokens are
    counted on the sampled ids (`think_tokens`)."""
    rows = []
    for group in groups:
        row = []
        for response in group.result.responses:
            ids = [t for t in response if t != tokenizer.eod]
            text = template.response_prefix + tokenizer.decode(ids)
            think = think_tokens(tokenizer, ids, template.response_prefix)
            parts = reward(len(rows), text, think)
            row.append(
                (parts.total, parts.match, parts.length, think, len(response), not parts.parsed)
            )
        rows.append(row)
    size = len(groups[0].result.responses) if groups else 0
    t = torch.tensor(rows, dtype=torch.float64).reshape(len(groups), size, 6)  # [n, G, 6]
    return Scored(
        rewards=t[..., 0],
        match=t[..., 1],
        length=t[..., 2],
        think_tokens=t[..., 3],
        response_tokens=t[..., 4],
        unparsed=t[..., 5].bool(),
    )


def think_tokens(tokenizer, sampled: list[int], prefix: str) -> int:
    """Eq. 2's l: how many `sampled` ids the policy wrote inside the think block, which the
    template's response `prefix` opens: those before the first token that spells part of the
    last `</think>` of prefix + sampled text (the tag may span several tokens or share one with
    the text before it). Counted on the ids, not by re-tokenising the text, which can merge or
    split them differently. No closing tag: all of them; a tag inside the prefix only: 0.
    Bisection on the decoded length of sampled[:i+1], which never decreases (a token ending
    inside a UTF-8 character decodes to one U+FFFD, as the whole character would)."""
    cut = (prefix + tokenizer.decode(sampled)).rfind(prompts.THINK_CLOSE)
    if cut < 0:
        return len(sampled)
    start = cut - len(prefix)  # where the tag starts in the sampled text
    if start < 0:
        return 0
    lo, hi = 0, len(sampled)  # the first i whose decoded sampled[:i+1] reaches `start`
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(sampled[: mid + 1])) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo
