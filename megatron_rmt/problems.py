"""Next-token-reasoning problems: from chosen positions to rollout requests, from responses to
rewards, advantages and the RL microbatches.

A chosen position j of a window asks: given the document prefix up to and including token j,
what is token j+1 (the label at j)? The prompt holds that prefix (as text, see prompts.py) with
the budget sentence; each of the G responses is scored by its final prediction (exact token
match, or RPT's byte-prefix match) and, with the dynamic budget, by its reasoning length.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_rmt import budget as budget_mod
from megatron_rmt import prompts, rewards
from megatron_rmt.model.shared_prefix import PROMPT as PROMPT_SEGMENT
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
            seed=seed * 1_000_003 + i,
        )
        for i, ids in enumerate(prompt_ids, start=first)
    ]


def score(
    problems: list[Problem],
    results: list[RolloutResult],
    tokenizer,
    template,
    budget: int | None,
    rmt,
    prefix_match: bool,
) -> Scored:
    """Next-token rewards of every response. prefix_match: RPT's byte-prefix reward instead of
    exact match; budget None: no length reward (r = r_match)."""
    if len(problems) != len(results):
        raise ValueError(f"{len(problems)} problems but {len(results)} rollout results")
    targets = [tokenizer.token_text(p.target_id) for p in problems]
    continuations = [[tokenizer.token_text(t) for t in p.continuation_ids] for p in problems]

    def reward(i: int, text: str, think: int) -> rewards.RewardParts:
        if prefix_match:
            return rewards.rpt_reward(text, continuations[i])
        w, r_max, fold = rmt.length_reward_weight, rmt.length_reward_max, rmt.match_fold_case
        return rewards.next_token_reward(
            text, targets[i], think, budget, w=w, r_max=r_max, fold_case=fold
        )

    return score_responses(results, tokenizer, template, reward)


def score_responses(
    results: list[RolloutResult],
    tokenizer,
    template,
    reward: Callable[[int, str, int], rewards.RewardParts],
) -> Scored:
    """Score every response of every request with `reward(request index, text, thinking
    tokens)`, where text is the template's response prefix + the sampled text and thinking
    tokens are counted on the sampled ids (`think_tokens`)."""
    rows = []
    for i, result in enumerate(results):
        row = []
        for response in result.responses:
            ids = [t for t in response if t != tokenizer.eod]
            text = template.response_prefix + tokenizer.decode(ids)
            think = think_tokens(tokenizer, ids, template.response_prefix)
            parts = reward(i, text, think)
            row.append(
                (parts.total, parts.match, parts.length, think, len(response), not parts.parsed)
            )
        rows.append(row)
    group = len(results[0].responses) if results else 0
    t = torch.tensor(rows, dtype=torch.float64).reshape(len(results), group, 6)  # [n, G, 6]
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


def rl_microbatches(
    requests: list[RolloutRequest],
    results: list[RolloutResult],
    adv: torch.Tensor,  # [n, G]
    pad_id: int,
    rows: int | None = None,
    length_multiple: int = 1,
) -> list[dict]:
    """The RL microbatches: prompt + response rows, label position i predicting token i+1;
    `resp_mask` marks the labels that are response tokens.

    Default (`rows` None): one microbatch per group (its G rows), all padded on the right to the
    step's longest sequence so the pipeline schedule sees one shape. With `rows`, each group's
    rows are split into microbatches of at most that many rows (`split_rows`), each padded only
    to its own longest row. Lengths are rounded up to `length_multiple` (TP, with sequence
    parallelism). The loss is a per-token (or per-sequence) sum over a global count, so either
    layout gives the same total loss."""
    if not requests:
        return []
    pairs = list(zip(requests, results, strict=True))
    if rows is None:
        # The last token of the longest sequence is only ever a label, never an input.
        length = max(len(q.prompt_ids) + len(r) for q, res in pairs for r in res.responses) - 1
        return [
            _rows_microbatch(req, res, range(len(res.responses)), adv[i], pad_id, length,
                             length_multiple)
            for i, (req, res) in enumerate(pairs)
        ]  # fmt: skip
    return split_rows(pairs, adv, pad_id, rows, length_multiple)


def split_rows(
    pairs: list, adv: torch.Tensor, pad_id: int, rows: int, length_multiple: int = 1
) -> list[dict]:
    """Each group's rows, longest first, in microbatches of at most `rows` rows, each padded to
    its own longest row: less padding and at most `rows` x length activations at once."""
    out = []
    for i, (req, res) in enumerate(pairs):
        order = sorted(range(len(res.responses)), key=lambda k: -len(res.responses[k]))
        for start in range(0, len(order), rows):
            part = order[start : start + rows]
            length = len(req.prompt_ids) + len(res.responses[part[0]]) - 1
            out.append(_rows_microbatch(req, res, part, adv[i], pad_id, length, length_multiple))
    return out


def shared_prefix_microbatches(
    requests: list[RolloutRequest],
    results: list[RolloutResult],
    adv: torch.Tensor,  # [n, G]
    pad_id: int,
    multiple: int = 1,
) -> list[dict]:
    """One microbatch per group as one row (model/shared_prefix.py): the prompt once, then each
    response without its last token (only ever a label). Per row `[1, S]`: tokens, position_ids
    (each response continues from the prompt's end), segments (0 prompt, k + 1 response k, -1
    padding) and rows `[1, G * L]`, the position whose logits predict each response token; the
    per-token tensors are `[G, L]` over the responses alone, as `rl_microbatches`' are over
    whole rows: labels, resp_mask, old_logp. S and L are the step's largest, so the pipeline
    schedule sees one shape; S is rounded up to `multiple` (TP under sequence parallelism)."""
    if not requests:
        return []
    pairs = list(zip(requests, results, strict=True))
    seq = max(
        len(q.prompt_ids) + sum(max(len(r) - 1, 0) for r in res.responses) for q, res in pairs
    )
    seq = -(-seq // multiple) * multiple
    longest = max(max(len(r) for r in res.responses) for _, res in pairs)
    width = max(longest, 1)
    out = []
    for i, (req, res) in enumerate(pairs):
        g, p = len(res.responses), len(req.prompt_ids)
        tokens = torch.full((seq,), pad_id, dtype=torch.long)
        positions = torch.zeros(seq, dtype=torch.long)
        segments = torch.full((seq,), -1, dtype=torch.long)
        rows = torch.zeros(g, width, dtype=torch.long)
        labels = torch.full((g, width), pad_id, dtype=torch.long)
        resp_mask = torch.zeros(g, width)
        old_logp = torch.zeros(g, width)
        tokens[:p] = torch.tensor(req.prompt_ids)
        positions[:p] = torch.arange(p)
        segments[:p] = PROMPT_SEGMENT
        start = p
        for k, (resp, lps) in enumerate(zip(res.responses, res.logprobs, strict=True)):
            n = len(resp)
            inputs = max(n - 1, 0)
            tokens[start : start + inputs] = torch.tensor(resp[:inputs], dtype=torch.long)
            positions[start : start + inputs] = torch.arange(p, p + inputs)
            segments[start : start + inputs] = k + 1
            # Token t is predicted by the prompt's last position (t = 0) or by token t - 1.
            rows[k, :n] = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + inputs)])
            labels[k, :n] = torch.tensor(resp, dtype=torch.long)
            resp_mask[k, :n] = 1.0
            old_logp[k, :n] = torch.tensor(lps)
            start += inputs
        out.append(
            {
                "tokens": tokens.unsqueeze(0),
                "position_ids": positions.unsqueeze(0),
                "segments": segments.unsqueeze(0),
                "rows": rows.reshape(1, -1),
                "labels": labels,
                "resp_mask": resp_mask,
                "old_logp": old_logp,
                "advantages": adv[i].float(),  # [G]
            }
        )
    return out


def _rows_microbatch(req, res, part, adv_row, pad_id: int, length: int, multiple: int) -> dict:
    """The rows `part` of one group as a microbatch of `length` label positions (rounded up to
    `multiple`)."""
    length = -(-length // multiple) * multiple
    g = len(part)
    tokens = torch.full((g, length + 1), pad_id, dtype=torch.long)  # [g, L+1]
    resp_mask = torch.zeros(g, length)  # [g, L]
    old_logp = torch.zeros(g, length)  # [g, L]
    p = len(req.prompt_ids)
    for row, k in enumerate(part):
        resp, lps = res.responses[k], res.logprobs[k]
        tokens[row, :p] = torch.tensor(req.prompt_ids)
        tokens[row, p : p + len(resp)] = torch.tensor(resp, dtype=torch.long)
        resp_mask[row, p - 1 : p - 1 + len(resp)] = 1.0
        old_logp[row, p - 1 : p - 1 + len(resp)] = torch.tensor(lps)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "resp_mask": resp_mask,
        "old_logp": old_logp,
        "advantages": adv_row[list(part)].float(),  # [g]
    }
