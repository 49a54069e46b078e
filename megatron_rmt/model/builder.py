"""Build Megatron-Core `GPTModel` stages for the three families this project trains.

Qwen3: RMSNorm, SwiGLU, QK-norm, GQA, RoPE, no biases. Qwen2 (DeepSeek-R1-Distill-Qwen): the same
with a bias on the fused QKV projection and no QK-norm. Llama (SmolLM2): no QK-norm, no biases.
Whether embeddings are tied is a per-checkpoint setting (`untie_embeddings_and_output_weights`).

The layer spec is chosen here and only here: Transformer Engine's when it imports, Megatron's
local modules otherwise. On CPU the fused kernels are switched off and weights initialise on the
CPU (which also makes TP shards slices of one full initialisation). The memory features
(activation recompute, sequence parallelism) and the GPU fusions the config asks for are passed
to Megatron's TransformerConfig; those that need kernels this host lacks fail at build with one
line saying so (`check_features`).
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rmt import platform
from megatron_rmt.config import ConfigError, ModelConfig
from megatron_rmt.model.shared_prefix import with_masked_attention


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return platform.cuda_available()


def use_transformer_engine(m: ModelConfig) -> bool:
    if m.transformer_impl == "transformer_engine" and not te_available():
        raise RuntimeError("transformer_impl=transformer_engine but Transformer Engine is absent")
    return m.transformer_impl == "transformer_engine" or (
        m.transformer_impl == "auto" and te_available()
    )


def layer_spec(m: ModelConfig) -> ModuleSpec:
    te = use_transformer_engine(m)
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=m.qk_layernorm, normalization="RMSNorm")
    if m.rl_layout == "shared_prefix":
        spec = with_masked_attention(spec, te)
    return spec


def check_features(m: ModelConfig) -> None:
    """Refuse features whose kernels or modules this host lacks, before Megatron asserts deep
    inside a layer: sequence parallelism needs Transformer Engine's norms (Megatron's torch norm,
    the local spec's RMSNorm, rejects it); RoPE fusion needs Transformer Engine; gradient-
    accumulation fusion needs TE's linear layers or apex's fused_weight_gradient_mlp_cuda."""
    te = use_transformer_engine(m)
    need = {
        "sequence_parallel": te,
        "apply_rope_fusion": te,
        "gradient_accumulation_fusion": te or _apex_wgrad_available(),
    }
    for name, ok in need.items():
        if getattr(m, name) and not ok:
            raise ConfigError(
                f"model.{name} needs Transformer Engine on a GPU (this host: "
                f"{'GPU' if platform.cuda_available() else 'CPU'}, "
                f"transformer_impl {m.transformer_impl}); turn it off here"
            )


def _apex_wgrad_available() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return platform.cuda_available()


def transformer_config(
    m: ModelConfig, tp: int, pp: int, initialize: bool = True
) -> TransformerConfig:
    on_gpu = platform.cuda_available()
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        perform_initialization=initialize,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=m.bf16,
        # Each loss term is normalised by its own global token count (see losses.py).
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=m.apply_rope_fusion,
        gradient_accumulation_fusion=m.gradient_accumulation_fusion,
        # Only apex's FusedLayerNorm (LayerNorm, not RMSNorm) has a persistent kernel: TE's norms
        # ignore the flag and Megatron's torch norm, the local spec's RMSNorm, rejects it.
        persist_layer_norm=False,
        sequence_parallel=m.sequence_parallel and tp > 1,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """The vocabulary padded so every TP shard has equal rows: a multiple of lcm(divisible_by,
    tp). Unlike Megatron-LM's `divisible_by * tp`, the result does not change with TP when TP
    divides `divisible_by` (128), so a checkpoint and its losses are the same at any TP."""
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def build_model(m: ModelConfig, vocab_size: int, initialize: bool = True) -> GPTModel:
    """This rank's pipeline stage of the model (TP/PP come from the initialised parallel state).

    `initialize=False` skips random initialisation (uninitialised memory) for a model whose
    weights are loaded right after: faster, and no transient full-size initial tensor."""
    check_features(m)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    model = gpt_model(
        m,
        vocab_size,
        transformer_config(m, tp, pp, initialize),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    return model.to(platform.device())


def gpt_model(
    m: ModelConfig, vocab_size: int, tconf: TransformerConfig, pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:  # fmt: skip
    """The GPTModel of `m` for a given TransformerConfig, on the current default device."""
    return GPTModel(
        config=tconf,
        transformer_layer_spec=layer_spec(m),
        vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
    )


def frozen(model: GPTModel) -> list:
    """`model` in eval mode without gradients, as the one-chunk list Megatron's schedules take:
    for models that are only run forward (the KL reference, evaluation)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return [model]
