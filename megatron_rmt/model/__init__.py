"""Megatron-Core GPT models in the Qwen3, Qwen2 and Llama architectures, and their HF mapping."""

from megatron_rmt.model.builder import build_model, frozen, padded_vocab_size, transformer_config

__all__ = ["build_model", "frozen", "padded_vocab_size", "transformer_config"]
