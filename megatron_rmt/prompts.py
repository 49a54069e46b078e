"""Prompts for next-token reasoning and math, and reading the prediction back out of a response.

Templates are data: `templates/<name>.yaml` with `kind` (`plain` for base models, `chat` for the
tokenizer's chat template), `user` (the instruction, `string.Template` placeholders `${text}`,
`${budget}` and `${ending}`, the text's last few words), optional `system`, and `response_prefix`, text placed after the prompt (the
assistant turn for chat) so the response begins inside the reasoning block.

The response format, one for every template: reasoning inside `<think>...</think>`, then the
answer as `\\boxed{...}` after `</think>`. The prediction is the content of the last `\\boxed{}`
after the last `</think>`; no closed think block, no box or an unclosed box mean no prediction
(None), which the reward scores 0.
"""

import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

TEMPLATE_DIR = Path(__file__).parent / "templates"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    kind: str  # "plain" or "chat"
    user: str
    response_prefix: str = ""
    system: str | None = None
    reasoning_budget: str | None = None  # the budget sentence, with ${budget}
    reasoning_free: str | None = None  # its replacement when there is no budget


def load_template(name: str, directory: Path = TEMPLATE_DIR) -> PromptTemplate:
    """Read `<directory>/<name>.yaml` (the NTR and math templates in templates/ ship here)."""
    data = yaml.safe_load((directory / f"{name}.yaml").read_text())
    template = PromptTemplate(name=name, **data)
    if template.kind not in ("plain", "chat"):
        raise ValueError(f"template {name}: kind must be 'plain' or 'chat', not {template.kind!r}")
    return template


ENDING_WORDS = 4  # words of the text that `${ending}` restates


def text_ending(text: str, words: int = ENDING_WORDS) -> str:
    """The text's last `words` space-separated words with the space before each (all of the
    text when it has fewer): restated right before the answer, they give the prediction the
    same local context as in the text (templates/ntr_restated.yaml)."""
    parts = text.rsplit(" ", words)
    if len(parts) <= words:
        return text if text.startswith(" ") else " " + text
    return " " + " ".join(parts[-words:])


def render_user(template: PromptTemplate, text: str, budget: int | None) -> str:
    """The instruction with the text (and budget) filled in; literal `$` in `text` is safe.
    `${ending}` is the text's last words (`text_ending`)."""
    values = {"text": text} if budget is None else {"text": text, "budget": budget}
    if "${ending}" in template.user:
        values["ending"] = text_ending(text)
    if template.reasoning_budget is not None:
        sentence = template.reasoning_free if budget is None else template.reasoning_budget
        values["reasoning"] = string.Template(sentence).substitute(values)
    try:
        return string.Template(template.user).substitute(values)
    except KeyError as missing:
        raise ValueError(f"template {template.name} needs {missing}") from None


def encode_prompt(tokenizer, template: PromptTemplate, text: str, budget: int | None) -> list[int]:
    """Token ids of the full prompt for a Hugging Face tokenizer."""
    user = render_user(template, text, budget)
    if template.kind == "plain":
        # add_special_tokens gives the BOS token to tokenizers that define one (Llama), not Qwen.
        return tokenizer.encode(user + template.response_prefix, add_special_tokens=True)
    messages = [{"role": "user", "content": user}]
    if template.system is not None:
        messages.insert(0, {"role": "system", "content": template.system})
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The chat template already wrote any BOS into the text.
    return tokenizer.encode(chat + template.response_prefix, add_special_tokens=False)


def build_prompt_ids(
    tokenizer, template: PromptTemplate, prefix_ids: list[int], budget: int | None
) -> list[int]:
    """Prompt ids asking for the token that follows the document prefix `prefix_ids`.

    The prefix is decoded to text once and re-encoded inside the prompt, so its tokens inside
    the prompt may differ from `prefix_ids` (tokenisation drift): BPE can merge across the
    junction with the instruction, and a prefix ending inside a multi-byte character decodes to
    a replacement character. The target stays the original next token either way.
    """
    text = tokenizer.decode(prefix_ids)
    return encode_prompt(tokenizer, template, text, budget)


def split_response(text: str) -> tuple[str, str | None]:
    """(thinking, answer): around the last `</think>`, a leading `<think>` dropped from the
    thinking. An unclosed think block gives (everything, None)."""
    head, sep, answer = text.rpartition(THINK_CLOSE)
    thinking = head if sep else text
    thinking = thinking.lstrip()
    if thinking.startswith(THINK_OPEN):
        thinking = thinking[len(THINK_OPEN) :]
    return thinking, (answer if sep else None)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed, `\\{` is not a brace);
    None without a box or when that box never closes."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. \{ or \}, never opens or closes
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def extract_prediction(text: str) -> str | None:
    """The final prediction: the last `\\boxed{}` after the last `</think>`, else None."""
    _, answer = split_response(text)
    return None if answer is None else last_boxed(answer)
