"""Per-GPU peak memory of one RMT step, predicted from the config and the parallel layout.

The step has three moments that can be the peak (docs/memory.md has the table for the paper's
14B setting and the check against measured CPU peaks):
- the NTP pass: one window microbatch's activations (PP stages hold up to PP in flight);
- the RL pass: one RL microbatch of `rows x (prompt + response)` tokens, usually the largest;
- the optimizer step: torch's foreach Adam allocates temporaries (CPU; fused Adam on GPU).
Each adds to the state that lives all step: weights, fp32 main gradients (`grad_reduce_in_fp32`),
optimizer state (bf16: fp32 master + Adam m, v = 12 B/param; fp32: m, v = 8 B/param; divided
over DP by the distributed optimizer) and, with kl_beta > 0, the frozen reference weights.

Activations per token per layer are counted in elements from what autograd keeps (Korthikanti
et al.'s method, redone for this architecture: RMSNorm, SwiGLU, GQA, QK-norm, no dropout):
- replicated over TP unless sequence parallelism splits them: the two norms' inputs and outputs
  (= the QKV and FC1 GEMM inputs): 4h (torch's composed RMSNorm on CPU: 6h);
- split over TP: QK-norm inputs (q + kv, Qwen3), core attention, the out-projection input (q),
  SwiGLU (fused kernel: its 2f input; unfused torch ops: 4f) and the FC2 input f;
- core attention: Transformer Engine's flash attention keeps Q, K, V, O (2q + 2kv); Megatron's
  local attention keeps Q, K and V expanded to every head (3q) and the softmax probabilities
  (a x s per token, fp32), its output being the out-projection input above.
Full recompute keeps only each recomputed group's input (h, /TP with SP) and rebuilds one group
at a time; selective recompute drops the core attention's internals and keeps its inputs.
The last stage also holds the logits (`tokens x v/TP`, in the parameter dtype: the CE + entropy
kernel writes the gradient over them) and backward needs a working set, taken as one layer's
activations of the microbatch. A fixed runtime overhead (CUDA context, NCCL buffers, allocator
slack) is added on GPU.
"""

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Params:
    """Parameter counts of the whole model, split as the layout shards them."""

    layer_sharded: int  # per transformer layer, split over TP
    layer_replicated: int  # per layer, on every TP rank (norms)
    embedding: int  # word embeddings (split over TP by vocabulary)
    output: int  # output layer (0 when tied to the embedding)
    final_norm: int

    def per_rank(self, num_layers: int, tp: int, pp: int) -> int:
        """Parameters of the largest stage on one TP rank (the first holds the embedding, the
        last the output layer; with PP 1 both)."""
        layers = num_layers // pp * (self.layer_sharded // tp + self.layer_replicated)
        first = self.embedding // tp
        last = self.output // tp + self.final_norm
        if pp == 1:
            return layers + first + last
        return layers + max(first, last)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    distributed_optimizer: bool = True


@dataclass(frozen=True)
class Workload:
    """The tokens of the step's largest microbatches."""

    ntp_tokens: int  # micro_batch_size x seq_length
    rl_rows: int  # rows of one RL microbatch (G, or rl_micro_batch_rows)
    rl_length: int  # prompt + response tokens of the longest row


@dataclass(frozen=True)
class Estimate:
    weights: float
    grads: float
    optimizer: float
    reference: float
    ntp_activations: float
    rl_activations: float
    logits: float  # of the larger pass
    optimizer_transient: float
    overhead: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference + self.overhead

    @property
    def peak(self) -> float:
        passes = max(self.ntp_activations, self.rl_activations) + self.logits
        return self.static + max(passes, self.optimizer_transient)


def count_params(model) -> Params:
    """Params of a GPTModel built at TP 1 (e.g. on the meta device), split the way TP shards
    them: Megatron marks sharded weights with `tensor_model_parallel`."""
    sharded = replicated = embedding = output = final_norm = 0
    layers = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("decoder.layers."):
            layers = max(layers, int(name.split(".")[2]) + 1)
            if getattr(p, "tensor_model_parallel", False):
                sharded += n
            else:
                replicated += n
        elif name.startswith("embedding."):
            embedding += n
        elif name.startswith("output_layer."):
            output += n
        else:
            final_norm += n
    return Params(sharded // layers, replicated // layers, embedding, output, final_norm)


def layer_activation_elements(m, tp: int, seq: int, fused: bool) -> float:
    """Elements autograd keeps per token of one layer (no recompute), on one TP rank.

    `fused`: Transformer Engine's layers on GPU (fused RMSNorm keeping its input, flash
    attention, fused SwiGLU). Otherwise torch's ops as on CPU: RMSNorm is composed of ops that
    also keep the normalised tensor, SwiGLU keeps the silu output, attention keeps the fp32
    probabilities (tests/test_memory.py checks these terms against saved-tensor hooks)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    norm = 1 if fused else 2  # tensors a norm keeps besides its output (the GEMM input)
    replicated = 2 * (norm + 1) * h
    sharded = q + f  # the out-projection and FC2 inputs
    if m.qk_layernorm:  # torch's composed norm: input and normalised tensor; K's input is a
        sharded += q + kv if fused else 3 * q + 3 * kv  # view of the whole QKV GEMM output
    if fused:  # flash attention: Q, K, V, O; fused SwiGLU: its input
        sharded += 2 * q + 2 * kv + 2 * f
    else:  # Q, K and V per head, the softmax probabilities; SwiGLU: input and two f-sized
        sharded += 3 * q + m.num_attention_heads * seq + 4 * f
    sp = m.sequence_parallel and tp > 1
    return (replicated / tp if sp else replicated) + sharded / tp


def activation_bytes(m, layout: Layout, tokens: int, seq: int, fused: bool) -> float:
    """Activations one microbatch of `tokens` (rows x seq) keeps on the stage with most, plus
    the backward working set (one layer's activations)."""
    tp, pp = layout.tp, layout.pp
    elem = 2 if m.bf16 else 4
    full = layer_activation_elements(m, tp, seq, fused) * elem * tokens
    layers = m.num_layers // pp
    sp = m.sequence_parallel and tp > 1
    layer_input = m.hidden_size / (tp if sp else 1) * elem * tokens
    if m.recompute_granularity == "full":
        k = m.recompute_num_layers
        if m.recompute_method == "uniform":
            kept = -(-layers // k) * layer_input + k * full
        else:  # block: the first k layers recomputed one at a time, the others keep everything
            kept = min(k, layers) * layer_input + (layers - min(k, layers)) * full + full
    elif m.recompute_granularity == "selective":
        d = m.kv_channels or m.hidden_size // m.num_attention_heads
        q, kv = m.num_attention_heads * d, m.num_query_groups * d
        internals = (2 * q + 2 * kv) if fused else (3 * q + m.num_attention_heads * seq)
        inputs = q + 2 * kv
        kept = layers * (full - (internals - inputs) / tp * elem * tokens) + full
    else:
        kept = layers * full
    # 1F1B keeps up to PP microbatches in flight on the first stage.
    in_flight = pp if pp > 1 else 1
    return kept * in_flight + full  # + the backward working set


def predict(
    m, layout: Layout, params: Params, work: Workload, *, gpu: bool, kl_beta: float = 0.0,
    vocab: int | None = None,
) -> Estimate:  # fmt: skip
    """The per-GPU (per-process on CPU) memory of a steady-state step, in bytes."""
    n = params.per_rank(m.num_layers, layout.tp, layout.pp)
    elem = 2 if m.bf16 else 4
    shard = layout.dp if layout.distributed_optimizer and layout.dp > 1 else 1
    optimizer = n * (12 if m.bf16 else 8) / shard
    ntp = activation_bytes(m, layout, work.ntp_tokens, m.seq_length, fused=gpu)
    rl_tokens = work.rl_rows * work.rl_length
    rl = activation_bytes(m, layout, rl_tokens, work.rl_length, fused=gpu) if rl_tokens else 0.0
    vocab = vocab or m.vocab_size
    logits = max(work.ntp_tokens, rl_tokens) * vocab / layout.tp * elem
    return Estimate(
        weights=n * elem,
        grads=n * 4.0,
        optimizer=optimizer,
        reference=n * elem if kl_beta > 0 else 0.0,
        ntp_activations=ntp,
        rl_activations=rl,
        logits=logits,
        # torch's foreach AdamW (CPU) allocates about one fp32 copy of the shard; fused on GPU
        optimizer_transient=0.0 if gpu else n * 4.0 / shard,
        overhead=3.0 * GIB if gpu else 0.0,
    )


def table(est: Estimate) -> list[tuple[str, float]]:
    """(component, GiB) rows for printing."""
    rows = [
        ("weights", est.weights),
        ("fp32 main grads", est.grads),
        ("optimizer state", est.optimizer),
        ("reference model", est.reference),
        ("NTP activations", est.ntp_activations),
        ("RL activations", est.rl_activations),
        ("logits (larger pass)", est.logits),
        ("optimizer transient", est.optimizer_transient),
        ("runtime overhead", est.overhead),
        ("predicted peak", est.peak),
    ]
    return [(name, value / GIB) for name, value in rows]
