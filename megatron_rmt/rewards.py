"""Rewards for next-token reasoning (RMT and the RPT baseline) and for math post-training.

Choices the paper leaves open, and why:
- Match normalisation: surrounding whitespace is stripped from prediction and target, since the
  model cannot reliably write a leading space inside `\\boxed{}` and most BPE tokens carry one
  (" Paris"). Case matters by default ("Paris" and "paris" are different tokens); `fold_case`
  (`--match-fold-case`) folds it. The prefix reward never folds case (RPT's is byte-exact). A whitespace-only target is matched only by an empty box.
- Prefix reward (RPT): the prediction's UTF-8 bytes must equal the bytes of the first k true
  continuation tokens for some k >= 1, so it ends on a real token boundary; same whitespace
  normalisation. Works on bytes because byte-level BPE tokens can split a character.
- Composite (Eq. 5): r = (1 - w) r_match + w r_len with w = 0.1 and r_max = 1: a correct answer
  always outranks any length, while groups whose samples all miss still differ in length reward
  and so still carry a GRPO signal towards the format and the budget.
- A response without a readable prediction (its think block never closes, or no `\\boxed{}`
  follows) earns nothing, length included. GRPO normalises rewards within a group, so a length
  reward paid to unreadable answers is a signal of its own that the format does not matter:
  measured on SmolLM2-135M after the cold start, the unreadable share went from 12% to 100% in
  five RMT steps when only a closed think block was required.
- Math answers: last `\\boxed{}` after `</think>`, compared after removing `$`, spacing commands,
  `\\left`/`\\right`, `\\text{}` wrappers, degree marks, percent signs and thousands separators,
  and as exact rationals when both sides are numbers (`0.5`, `1/2`, `\\frac{1}{2}`, `\\dfrac12`).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from megatron_rmt.budget import length_reward
from megatron_rmt.prompts import extract_prediction, last_boxed, split_response

DEFAULT_W = 0.1
DEFAULT_R_MAX = 1.0


@dataclass(frozen=True)
class RewardParts:
    """One response's reward and its components, each logged on its own."""

    total: float
    match: float  # exact token / prefix / math answer, 0 or 1
    length: float  # r_len (0 when not used)
    parsed: bool  # whether a prediction could be extracted at all


def normalise_token(text: str, fold_case: bool = False) -> str:
    text = text.strip()
    return text.casefold() if fold_case else text


def match_reward(prediction: str | None, target_token_text: str, fold_case: bool = False) -> float:
    """1.0 if the prediction equals the true next token after normalisation, else 0.0."""
    if prediction is None:
        return 0.0
    same = normalise_token(prediction, fold_case) == normalise_token(target_token_text, fold_case)
    return float(same)


def prefix_reward(prediction: str | None, continuation_token_texts: Sequence[str | bytes]) -> float:
    """RPT: 1.0 if the prediction's bytes are exactly the first k continuation tokens' bytes."""
    if prediction is None:
        return 0.0
    want = prediction.encode().strip()
    joined = b""
    for token in continuation_token_texts:
        joined += token.encode() if isinstance(token, str) else token
        if joined.strip() == want:
            return 1.0
        if len(joined.strip()) > len(want):
            break  # appending tokens only lengthens it: no later boundary can match
    return 0.0


def composite(r_match: float, r_len: float, w: float = DEFAULT_W) -> float:
    """Eq. 5: (1 - w) r_match + w r_len."""
    return (1.0 - w) * r_match + w * r_len


def next_token_reward(
    response: str,
    target_token_text: str,
    think_tokens: int,
    budget: int | None,
    *,
    w: float = DEFAULT_W,
    r_max: float = DEFAULT_R_MAX,
    fold_case: bool = False,
) -> RewardParts:
    """RMT's reward for one response. `think_tokens` is the token count inside the think block;
    `budget` None disables the length term (the "without DTB" ablation): total = match."""
    prediction = extract_prediction(response)
    r_match = match_reward(prediction, target_token_text, fold_case)
    if budget is None:
        return RewardParts(r_match, r_match, 0.0, prediction is not None)
    r_len = length_reward(think_tokens, budget, r_max) if prediction is not None else 0.0
    return RewardParts(composite(r_match, r_len, w), r_match, r_len, prediction is not None)


def rpt_reward(response: str, continuation_token_texts: Sequence[str | bytes]) -> RewardParts:
    """The RPT baseline's reward: prefix matching only, no length term."""
    prediction = extract_prediction(response)
    r = prefix_reward(prediction, continuation_token_texts)
    return RewardParts(r, r, 0.0, prediction is not None)


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_DROPPED = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\%", "%", "°")
_DEGREES = re.compile(r"\^\{?\\circ\}?|\\degree")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TRAILING_ZEROS = re.compile(r"(\d)\.0+(?!\d)")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]=")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)")


def normalise_math(answer: str) -> str:
    """A canonical string for simple final answers (see the module docstring)."""
    text = _TEXT_WRAPPER.sub(r"\1", answer.strip())
    text = _DEGREES.sub("", text)
    for piece in _DROPPED:
        text = text.replace(piece, "")
    text = text.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    text = re.sub(r"\s+", "", text)
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _THOUSANDS.sub("", text)
    text = _TRAILING_ZEROS.sub(r"\1", text)
    return _ASSIGNMENT.sub("", text)


def _as_rational(text: str) -> Fraction | None:
    """The exact value of a normalised integer, decimal or fraction; None for anything else."""
    if _NUMBER.fullmatch(text):
        return Fraction(text)
    frac = _FRACTION.fullmatch(text)
    if frac is None:
        return None
    sign, num, den = (frac[1], frac[2], frac[3]) if frac[2] else ("", frac[4], frac[5])
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign else value


def math_answers_equal(prediction: str, gold: str) -> bool:
    a, b = normalise_math(prediction), normalise_math(gold)
    if a == b:
        return True
    ra, rb = _as_rational(a), _as_rational(b)
    return ra is not None and ra == rb


def math_answer_reward(response: str, gold: str) -> RewardParts:
    """1.0 if the response's final boxed answer equals `gold` (itself a boxed answer's content)."""
    _, answer = split_response(response)
    prediction = None if answer is None else last_boxed(answer)
    r = float(prediction is not None and math_answers_equal(prediction, gold))
    return RewardParts(r, r, 0.0, prediction is not None)
