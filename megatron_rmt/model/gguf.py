"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: HF-named float32 tensors + config.json.

Only the `llama` architecture is read (SmolLM2 and other Llama-family models). Tensors are
dequantised one at a time, on request (the file itself is memory-mapped), so a converter streams a
GGUF exactly as it streams safetensors. llama.cpp stores the rows of the q and k projections
permuted (each head's rotary halves interleaved, the layout its RoPE kernel wants);
`unpermute_rope_rows` restores HF's "rotate_half" order. The tokenizer inside the file is turned
into HF tokenizer files by transformers' own GGUF tokenizer conversion.
"""

import os

import numpy as np
import torch

from megatron_rmt.model.hf_config import UnsupportedModelError

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. w [heads*d, ...]: llama.cpp orders each head's rows
    as (pair index, half) where HF orders them (half, pair index)."""
    rest = w.shape[1:]
    return w.reshape(num_heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: `config` (config.json dict), `shapes` (HF name ->
    shape), `get_tensor(hf_name)` -> float32 tensor."""

    def __init__(self, path: str):
        import gguf

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file not found")
        self.path = path
        self._reader = gguf.GGUFReader(path)
        arch = self._field("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r}; only 'llama' is read")
        self._tensors = {}
        for t in self._reader.tensors:
            self._tensors[_hf_name(t.name)] = t
        self.config = self._hf_config()
        self.shapes = {n: tuple(reversed(t.shape.tolist())) for n, t in self._tensors.items()}

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _hf_config(self) -> dict:
        f = self._field
        heads = f("llama.attention.head_count")
        hidden = f("llama.embedding_length")
        vocab = f("llama.vocab_size") or len(f("tokenizer.ggml.tokens"))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": f("llama.feed_forward_length"),
            "num_hidden_layers": f("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": f("llama.attention.head_count_kv", heads),
            "head_dim": f("llama.attention.key_length", hidden // heads),
            "hidden_act": "silu",
            "max_position_embeddings": f("llama.context_length"),
            # float32 metadata: 1e-5 is stored as 9.99999974e-06; round back to what HF writes
            "rms_norm_eps": float(
                np.format_float_positional(np.float32(f("llama.attention.layer_norm_rms_epsilon")))
            ),
            "rope_theta": float(f("llama.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": f("tokenizer.ggml.bos_token_id"),
            "eos_token_id": f("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }

    def get_tensor(self, hf_name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[hf_name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols] float32, HF layout
        if not data.flags.writeable:  # unquantised tensors come back as views of the mmap
            data = data.copy()
        w = torch.from_numpy(data).reshape(self.shapes[hf_name])
        if hf_name.endswith("q_proj.weight"):
            return unpermute_rope_rows(w, self.config["num_attention_heads"])
        if hf_name.endswith("k_proj.weight"):
            return unpermute_rope_rows(w, self.config["num_key_value_heads"])
        return w

    def save_tokenizer(self, out_dir: str) -> None:
        """HF tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into out_dir."""
        from transformers import AutoTokenizer

        folder, name = os.path.split(os.path.abspath(self.path))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")
