"""One small tokenizer wrapper for preprocessing, the data pipeline and the trainer's prompts.

Two kinds, named as Megatron-LM names them:
- `HuggingFaceTokenizer`: a directory holding `tokenizer.json` (and optionally
  `tokenizer_config.json` with a chat template), e.g. Qwen3 or SmolLM2.
- `GPT2BPETokenizer`: the original GPT-2 `vocab.json` + `merges.txt`.

Deliberate choices:
- Both are served by the Rust `tokenizers` library directly: loading takes milliseconds and
  encoding has no Python-side overhead, which keeps preprocessing close to the bare tokenizer's
  speed. `transformers` is imported only for `apply_chat_template`, because Jinja chat templates
  rely on helpers it provides.
- By default no special tokens are added (no BOS): documents are separated by an explicit EOD
  id. `encode` and `apply_chat_template` take Hugging Face's keyword names, so prompt code
  written against a transformers tokenizer works with this one.
  Special-token text inside a document (e.g. a literal `<|endoftext|>`) is matched as the special
  token, as Hugging Face tokenizers and Megatron-LM's HuggingFaceTokenizer do.
- `eod` (`eod_token`): `endoftext` (default) is `<|endoftext|>` when the vocabulary has it
  (Qwen3, GPT-2, SmolLM2), else the tokenizer's `eos_token`: the document separator these
  models were pretrained with. `eos` is Megatron-LM's: a Hugging Face tokenizer's `eos_token`
  (Qwen3: `<|im_end|>`, a chat turn's end), GPT-2's `<|endoftext|>`. Shards and trainer must
  use the same one; `eod_choices` holds what each choice gives, to tell shards apart.
- The object carries `vocab_size`, `eod` and `unique_identifiers` (part of the dataset index
  cache key), which is all megatron.core's GPTDataset asks of its tokenizer, so it is passed to
  GPTDatasetConfig as it is; no MegatronTokenizer subclass is needed.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

_EOD_TEXT = "<|endoftext|>"
EOD_CHOICES = ("endoftext", "eos")


class TextTokenizer:
    """Encode/decode text with a `tokenizers.Tokenizer`; see the module docstring."""

    def __init__(
        self,
        backend: Tokenizer,
        eod: int,
        source: str,
        hf_dir: str | None = None,
        eod_choices: dict[str, int] | None = None,
    ):
        self._backend = backend
        self.eod = eod
        self.eod_choices = eod_choices or {}  # eod_token choice -> the id it gives
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.source = source  # the files it was built from, for cache keys and messages
        self._hf_dir = hf_dir
        self._chat = None  # transformers tokenizer, loaded on first apply_chat_template

    @property
    def unique_identifiers(self) -> dict:
        """What megatron.core hashes into its dataset index cache key."""
        return {"class": type(self).__name__, "source": self.source, "eod": self.eod}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS
        for Llama-style tokenizers), as Hugging Face tokenizers do."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def special_ids(self) -> set[int]:
        """Ids of the special (control) tokens: EOD, chat markers, padding."""
        added = self._backend.get_added_tokens_decoder()
        return {i for i, token in added.items() if token.special} | {self.eod}

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (partial UTF-8 bytes decode to U+FFFD)."""
        return self.decode([token_id])

    @property
    def has_chat_template(self) -> bool:
        return self._hf_dir is not None and "chat_template" in _read_config(self._hf_dir)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs,
    ) -> list[int] | str:
        """Render `messages` with the tokenizer's own chat template; ids, or the text with
        `tokenize=False` (the Hugging Face signature). Extra keyword arguments reach the
        template (Qwen3: `enable_thinking=False`)."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template (no tokenizer_config.json one)")
        if self._chat is None:
            from transformers import AutoTokenizer

            self._chat = AutoTokenizer.from_pretrained(self._hf_dir)
        text = self._chat.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
        # The rendered text spells special tokens out; encode() maps them back to their ids.
        return self.encode(text) if tokenize else text


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    eod_token: str = "endoftext",
) -> TextTokenizer:
    """Build the tokenizer Megatron-LM's flags describe (`--tokenizer-type` and its files);
    `eod_token` picks the EOD id (module docstring)."""
    if eod_token not in EOD_CHOICES:
        raise ValueError(f"eod_token must be one of {EOD_CHOICES}, not {eod_token!r}")
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model DIR")
        path = os.path.join(tokenizer_model, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_model}")
        backend = Tokenizer.from_file(path)
        choices = _eod_choices(backend, tokenizer_model)
        return TextTokenizer(
            backend, _pick(choices, eod_token), os.path.abspath(path), tokenizer_model, choices
        )
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None or merge_file is None:
            raise ValueError("GPT2BPETokenizer needs --vocab-file and --merge-file")
        backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([_EOD_TEXT])  # already in vocab.json: marks it special
        source = f"{os.path.abspath(vocab_file)} + {os.path.abspath(merge_file)}"
        eod = backend.token_to_id(_EOD_TEXT)  # Megatron-LM's GPT-2 EOD too
        choices = dict.fromkeys(EOD_CHOICES, eod)
        return TextTokenizer(backend, eod, source, eod_choices=choices)
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r}: use HuggingFaceTokenizer or GPT2BPETokenizer"
    )


def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _eod_choices(backend: Tokenizer, hf_dir: str) -> dict[str, int]:
    """The EOD id of each `eod_token` choice this tokenizer supports."""
    eos = _read_config(hf_dir).get("eos_token")
    if isinstance(eos, dict):  # older configs store AddedToken objects
        eos = eos.get("content")
    eos_id = backend.token_to_id(eos) if eos else None
    text_id = backend.token_to_id(_EOD_TEXT)
    choices = {"endoftext": text_id if text_id is not None else eos_id, "eos": eos_id}
    return {name: i for name, i in choices.items() if i is not None}


def _pick(choices: dict[str, int], eod_token: str) -> int:
    if eod_token not in choices:
        wanted = "an eos_token" if eod_token == "eos" else f"{_EOD_TEXT} or an eos_token"
        raise ValueError(f"tokenizer has no {wanted} to use as EOD (--eod-token {eod_token})")
    return choices[eod_token]


def tokenizer_of(data_cfg) -> TextTokenizer:
    """The tokenizer the config's data flags name (`config.DataConfig`)."""
    d = data_cfg
    return build_tokenizer(
        d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file, d.eod_token
    )
