"""Hugging Face `config.json` <-> `ModelConfig`: which family a checkpoint is, and its shapes.

The family is decided by `architectures` (falling back to `model_type`); anything this project's
builder cannot reproduce exactly (RoPE scaling, sliding windows, biases the family does not have,
another activation) is refused here with the offending key, instead of converting into a model that
silently computes something else. Both spellings of the RoPE base are read: `rope_theta` (HF 4.x)
and `rope_parameters.rope_theta` (HF 5.x).

The Megatron vocabulary is the HF one padded the Megatron way (a multiple of
`make_vocab_size_divisible_by` x TP); the padded size is recorded in `ModelConfig.vocab_size` so every
later load builds exactly the rows the checkpoint holds.

`TOKENIZER_FILES` names the files that travel with a checkpoint in both directions.
"""

import os
import shutil

from megatron_rmt.config import ModelConfig
from megatron_rmt.model.builder import padded_vocab_size

ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
_MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",  # not the tokenizer, but its special ids belong with it
)


class UnsupportedModelError(ValueError):
    """The HF checkpoint is not one of the families the Megatron builder reproduces."""


def detect_family(hf: dict) -> str:
    """'qwen3' | 'qwen2' | 'llama' from a parsed config.json."""
    for arch in hf.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if hf.get("model_type") in _MODEL_TYPES and not hf.get("architectures"):
        return hf["model_type"]
    raise UnsupportedModelError(
        f"unknown architecture {hf.get('architectures')} (model_type {hf.get('model_type')!r}); "
        f"supported: {sorted(ARCHITECTURES)}"
    )


def rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: dict, family: str) -> None:
    problems = []
    scaling = hf.get("rope_scaling") or {}
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", scaling.get("rope_type"))
    if scaling or rope_type not in (None, "default"):
        problems.append(f"RoPE scaling {scaling or rope_type} (only plain RoPE is built)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU with silu is built)")
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true (full attention is built)")
    if family != "qwen2" and hf.get("attention_bias"):
        problems.append("attention_bias=true (only Qwen2 has QKV biases)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (MLPs are built without bias)")
    if problems:
        raise UnsupportedModelError("unsupported HF config: " + "; ".join(problems))


def model_config_from_hf(
    hf: dict, tp: int = 1, make_vocab_size_divisible_by: int = 128, **overrides
):
    """The `ModelConfig` that builds the same network as this HF config (vocab padded for `tp`)."""
    family = detect_family(hf)
    _check_supported(hf, family)
    heads = hf["num_attention_heads"]
    theta = rope_theta(hf)
    if theta != int(theta):
        raise UnsupportedModelError(f"rope_theta {theta} is not an integer (ModelConfig keeps int)")
    fields = dict(
        model_family=family,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        vocab_size=padded_vocab_size(hf["vocab_size"], make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        rotary_base=int(theta),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model_config(
    m: ModelConfig, vocab_size: int, dtype: str, base: dict | None = None
):
    """A config.json dict for `m`: `base` (e.g. the original HF config) with every shape field
    taken from `m`, so tokens ids, chat settings and the like survive a round trip."""
    hf = dict(base or {})
    hf.update(
        architectures=[_MODEL_TYPES[m.model_family]],
        model_type=m.model_family,
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        attention_bias=m.add_qkv_bias,
        torch_dtype=dtype,
    )
    hf.pop("rope_scaling", None)
    # Both spellings: HF 4.x (and older vLLM) read `rope_theta`, HF 5.x `rope_parameters`.
    hf["rope_theta"] = float(m.rotary_base)
    hf["rope_parameters"] = {"rope_theta": float(m.rotary_base), "rope_type": "default"}
    hf.pop("dtype", None)  # HF 5 spelling; `torch_dtype` above is read by both 4.x and 5.x
    return hf


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy whichever HF tokenizer files exist in src_dir; returns their names."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    for name in found:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return found
