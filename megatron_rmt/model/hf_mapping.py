"""The one mapping between Hugging Face and Megatron-Core parameters for Qwen3, Qwen2 and Llama.

Every Megatron parameter of a `GPTModel` stage has a `Rule`: the HF tensors it is made of and how
it is laid out over tensor parallelism:

  replicated  norms (RMSNorm weights, QK-norm)                       same tensor on every TP rank
  row         o_proj, down_proj                                      columns split over TP
  qkv         q/k/v_proj -> linear_qkv: per query group [its q heads; k; v] rows; TP splits groups
  gate_up     gate/up_proj -> linear_fc1: per TP rank [gate shard; up shard]
  vocab       embed_tokens / lm_head: rows padded with zeros to the Megatron vocabulary, then split

Both directions stream: loading asks a `get_tensor(hf_name)` callback for the (at most three) HF
tensors one parameter needs and keeps only this rank's shard; exporting gathers one parameter at a
time over the TP group and yields its HF tensors. Neither ever holds a second copy of the model.

Pipeline parallelism: each stage handles the layers it owns, named by their global index
(`layer.layer_number - 1`). With tied embeddings and PP > 1 the last stage holds a copy of the
embedding as `output_layer.weight`: it is loaded from `embed_tokens` and not exported.

Transformer Engine's layer spec fuses the pre-attention / pre-MLP norms into the next linear
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); both spellings map to the same
HF norms, so the mapping serves the local (CPU) and TE (GPU) specs alike.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rmt.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron parameter suffix inside a layer -> (TP layout, HF names relative to the HF layer).
_A, _M = "self_attn.", "mlp."
_LAYER_RULES = {
    "self_attention.linear_qkv.weight": (
        "qkv",
        (_A + "q_proj.weight", _A + "k_proj.weight", _A + "v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        (_A + "q_proj.bias", _A + "k_proj.bias", _A + "v_proj.bias"),
    ),
    "self_attention.linear_proj.weight": ("row", (_A + "o_proj.weight",)),
    "self_attention.q_layernorm.weight": ("replicated", (_A + "q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", (_A + "k_norm.weight",)),
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", (_M + "gate_proj.weight", _M + "up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", (_M + "down_proj.weight",)),
}
_GATHER_DIM = {"replicated": None, "row": 1, "qkv": 0, "gate_up": 0, "vocab": 0}


@dataclass(frozen=True)
class Rule:
    kind: str  # a key of _GATHER_DIM
    hf_names: tuple[str, ...]
    export: bool = True  # False for the last stage's copy of tied embeddings


def rule_for(name: str, global_layer: int | None, tied: bool) -> Rule:
    """The rule of one Megatron parameter (`name` as in this stage's named_parameters)."""
    if name == "embedding.word_embeddings.weight":
        return Rule("vocab", ("model.embed_tokens.weight",))
    if name == "output_layer.weight":
        if tied:
            return Rule("vocab", ("model.embed_tokens.weight",), export=False)
        return Rule("vocab", ("lm_head.weight",))
    if name == "decoder.final_layernorm.weight":
        return Rule("replicated", ("model.norm.weight",))
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_RULES:
        kind, names = _LAYER_RULES[match.group(2)]
        return Rule(kind, tuple(f"model.layers.{global_layer}.{n}" for n in names))
    raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")


def hf_tensor_shapes(m: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this model holds, with its shape (`vocab_rows` = HF's)."""
    h, d = m.hidden_size, m.kv_channels or m.hidden_size // m.num_attention_heads
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
        "mlp.up_proj.weight": (m.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, m.ffn_hidden_size),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    if m.add_qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,)})
        layer["self_attn.v_proj.bias"] = (kv,)
    if m.qk_layernorm:
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (vocab_rows, h), "model.norm.weight": (h,)}
    if m.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (vocab_rows, h)
    for i in range(m.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


# ----------------------------------------------------------------------------------------------
# Layout math (pure): full HF tensors <-> one TP rank's Megatron shard.


def qkv_shard(q, k, v, num_groups: int, tp_rank: int, tp: int) -> torch.Tensor:
    """q [heads*d, ...], k/v [groups*d, ...] -> this rank's linear_qkv rows
    [(groups/tp)*(heads/groups + 2)*d, ...]: per query group its q heads, then k, then v."""
    rest = q.shape[1:]
    qg = q.reshape(num_groups, -1, *rest)  # [g, heads/g*d, ...]
    kg = k.reshape(num_groups, -1, *rest)  # [g, d, ...]
    vg = v.reshape(num_groups, -1, *rest)
    per_rank = num_groups // tp
    mine = slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    return torch.cat([qg[mine], kg[mine], vg[mine]], dim=1).reshape(-1, *rest)


def split_qkv(fused, num_groups: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Inverse of qkv_shard over all ranks: fused [groups*(heads/groups+2)*d, ...] (TP shards
    concatenated) -> q [heads*d, ...], k [groups*d, ...], v [groups*d, ...]."""
    per_group = num_heads // num_groups
    rest = fused.shape[1:]
    g = fused.reshape(num_groups, per_group + 2, -1, *rest)  # [g, heads/g + 2, d, ...]
    q = g[:, :per_group].reshape(-1, *rest)
    return q, g[:, per_group].reshape(-1, *rest), g[:, per_group + 1].reshape(-1, *rest)


def gate_up_shard(gate, up, tp_rank: int, tp: int) -> torch.Tensor:
    """gate/up [ffn, h] -> this rank's linear_fc1 rows [2*ffn/tp, h] = [gate shard; up shard]."""
    return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])


def split_gate_up(fused, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fused [2*ffn, h] (TP shards concatenated) -> gate [ffn, h], up [ffn, h]."""
    f = fused.reshape(tp, 2, -1, *fused.shape[1:])  # [tp, gate|up, ffn/tp, h]
    return f[:, 0].reshape(-1, *fused.shape[1:]), f[:, 1].reshape(-1, *fused.shape[1:])


def vocab_shard(w, padded_rows: int, tp_rank: int, tp: int) -> torch.Tensor:
    """w [V, h] -> rows [padded/tp, h] of this rank; rows past V (Megatron's padding) are zero."""
    per_rank = padded_rows // tp
    start = tp_rank * per_rank
    if start + per_rank <= w.shape[0]:  # no padding in this shard: a view, no copy
        return w[start : start + per_rank]
    shard = w.new_zeros(per_rank, *w.shape[1:])
    real = w[start : start + per_rank]
    shard[: real.shape[0]] = real
    return shard


def to_shard(rule: Rule, tensors: list, m: ModelConfig, shard_shape, tp_rank: int, tp: int):
    """The Megatron shard (shape `shard_shape`) this rank holds of the rule's HF `tensors`."""
    if rule.kind == "replicated":
        return tensors[0]
    if rule.kind == "row":
        return tensors[0].chunk(tp, dim=1)[tp_rank]
    if rule.kind == "qkv":
        return qkv_shard(*tensors, m.num_query_groups, tp_rank, tp)
    if rule.kind == "gate_up":
        return gate_up_shard(*tensors, tp_rank, tp)
    return vocab_shard(tensors[0], shard_shape[0] * tp, tp_rank, tp)


def from_full(rule: Rule, full, m: ModelConfig, tp: int, vocab_rows: int | None):
    """The HF tensors of a gathered (full) Megatron parameter, in the order of rule.hf_names."""
    if rule.kind == "qkv":
        return split_qkv(full, m.num_query_groups, m.num_attention_heads)
    if rule.kind == "gate_up":
        return split_gate_up(full, tp)
    if rule.kind == "vocab" and vocab_rows is not None:
        return (full[:vocab_rows],)
    return (full,)


# ----------------------------------------------------------------------------------------------
# Model-level streaming, for the converters and the weight sync to the rollout service.


def _stage_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter, Rule]]:
    model = _unwrap(model)
    tied = model.share_embeddings_and_output_weights
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        layer = None
        if match:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
        yield name, param, rule_for(name, layer, tied)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def load_hf_tensors_into_megatron(
    model, model_cfg: ModelConfig, get_tensor: Callable[[str], torch.Tensor]
) -> None:
    """Fill this rank's stage of `model` (GPTModel, possibly wrapped) from HF tensors.

    `get_tensor(hf_name)` returns the full HF tensor (any float dtype, CPU); it is called once or
    a few times per tensor and its results are dropped as soon as the shard is copied. Raises
    ValueError naming the tensor and both shapes on any mismatch."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    expected = hf_tensor_shapes(model_cfg, vocab_rows=-1)
    for name, param, rule in _stage_parameters(model):
        tensors = [get_tensor(n) for n in rule.hf_names]
        for hf_name, t in zip(rule.hf_names, tensors, strict=True):
            _check_hf_shape(hf_name, tuple(t.shape), expected[hf_name], param.shape[0] * tp)
        shard = to_shard(rule, tensors, model_cfg, tuple(param.shape), tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(
                f"{name}: shard built from {rule.hf_names} has shape {tuple(shard.shape)}, "
                f"the Megatron parameter {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(shard)


def _check_hf_shape(hf_name: str, got: tuple, want: tuple, padded_rows: int) -> None:
    if want[0] == -1:  # vocabulary rows: any count the padded Megatron vocabulary can hold
        ok = len(got) == 2 and got[1] == want[1] and got[0] <= padded_rows
        want = (f"<= {padded_rows}", want[1])
    else:
        ok = got == want
    if not ok:
        raise ValueError(f"{hf_name}: checkpoint has shape {got}, the model expects {want}")


def megatron_to_hf_tensors(
    model, model_cfg: ModelConfig, vocab_size: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for the parameters of this rank's pipeline stage.

    Every TP rank of the stage must iterate in step (each parameter is all-gathered over the TP
    group) and every TP rank receives the full tensors; the caller keeps one rank's (TP rank 0)
    and drops the rest. Each PP stage yields only its own layers, under their global HF names:
    the caller of every stage writes or sends its part (nothing is gathered across stages).
    `vocab_size` trims Megatron's padded vocabulary rows back to HF's (None keeps them).
    Tensors are views on fresh gathered buffers (or the parameters themselves at TP=1): detach
    and copy before modifying them."""
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    for _, param, rule in _stage_parameters(model):
        if not rule.export:
            continue
        full = _gather(param.detach(), _GATHER_DIM[rule.kind], group, tp)
        yield from zip(rule.hf_names, from_full(rule, full, model_cfg, tp, vocab_size), strict=True)


def _gather(shard, dim: int | None, group, tp: int) -> torch.Tensor:
    if dim is None or tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
