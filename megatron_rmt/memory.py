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
  (a x s per token, fp32), its output being the out-projection input above. With
  `rl_layout: shared_prefix` the RL pass is one row per group (the prompt once, then the G
  responses) under an explicit `[rows, 1, s, s]` bool mask (model/shared_prefix.py), kept once
  for all layers; on GPU TE then runs its unfused attention (`core_attention_elements`).
Full recompute keeps only each recomputed group's input (h, /TP with SP) and rebuilds one group
at a time; selective recompute drops the core attention's internals and keeps its inputs.
The last stage also holds the logits (`tokens x v/TP`, in the parameter dtype: the CE + entropy
kernel writes the gradient over them) and the kernel's fp32 `[chunk, v/TP]` buffer; the
shared-prefix RL pass projects only the response positions, and `fused_linear_chunk_tokens`
replaces the NTP pass's logits by fused_linear.py's buffers (`fused_linear_bytes`). Backward
needs a working set, taken as one layer's activations of the microbatch. A fixed runtime
overhead (CUDA context, NCCL buffers, allocator slack) is added on GPU.
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
    rl_rows: int  # rows of one RL microbatch (G, or rl_micro_batch_rows; shared prefix: 1)
    rl_length: int  # prompt + response tokens of the longest row (shared prefix: the row's)
    rl_logit_tokens: int | None = None  # positions the RL pass projects (None: every token)
    rl_masked: bool = False  # shared prefix: the row's explicit attention mask


def shared_prefix_workload(
    ntp_tokens: int, group_size: int, prompt: int, response: int
) -> Workload:
    """The shared-prefix RL microbatch of one group (rl_batch.shared_prefix_batches): one row of
    the prompt, then each response less its last token (only ever a label); logits only at the
    G x response positions that predict a response token."""
    length = prompt + group_size * (response - 1)
    return Workload(ntp_tokens, 1, length, group_size * response, rl_masked=True)


@dataclass(frozen=True)
class Estimate:
    weights: float
    grads: float
    optimizer: float
    reference: float
    ntp_activations: float
    rl_activations: float
    ntp_logits: float  # or, with the fused linear, its buffers
    rl_logits: float
    optimizer_transient: float
    overhead: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference + self.overhead

    @property
    def peak(self) -> float:
        ntp = self.ntp_activations + self.ntp_logits
        rl = self.rl_activations + self.rl_logits
        return self.static + max(ntp, rl, self.optimizer_transient)


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


def core_attention_elements(
    m, tp: int, seq: int, rows: int, fused: bool, masked: bool
) -> tuple[float, float]:
    """Elements per token the core attention keeps: (split over TP, on every TP rank).

    Unmasked on GPU, flash attention: Q, K, V, O. On CPU, Megatron's local attention: Q and K, V
    per head (3q) and the fp32 probabilities (a shared-prefix mask is applied in place: no copy).
    Masked on GPU, TE's only backend for an arbitrary mask, UnfusedDotProductAttention: 3q and
    the probabilities. Its fused masked softmax keeps only its 16-bit output, and runs only for
    16-bit inputs with 16 < s < 16384, s % 8 == 0 and rows x heads/TP % 4 == 0; otherwise torch's
    softmax runs in fp32 and keeps its output (2 bf16 elements), the bf16 copy the next matmul
    saves, and the bool mask TE rebuilds each layer (`get_full_mask`) for its masked_fill_."""
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    a = m.num_attention_heads
    q, kv = a * d, m.num_query_groups * d
    if not fused:
        return 3 * q + a * seq, 0.0
    if not masked:
        return 2 * q + 2 * kv, 0.0
    if m.bf16 and 16 < seq < 16384 and seq % 8 == 0 and rows * (a // tp) % 4 == 0:
        return 3 * q + a * seq, 0.0
    elem = 2 if m.bf16 else 4
    probs = 3 if m.bf16 else 1
    return 3 * q + probs * a * seq, seq / elem


def layer_activation_elements(
    m, tp: int, seq: int, fused: bool, masked: bool = False, rows: int = 1
) -> float:
    """Elements autograd keeps per token of one layer (no recompute), on one TP rank.

    `fused`: Transformer Engine's layers on GPU (fused RMSNorm keeping its input, flash
    attention, fused SwiGLU). Otherwise torch's ops as on CPU: RMSNorm is composed of ops that
    also keep the normalised tensor, SwiGLU keeps the silu output, attention keeps the fp32
    probabilities (tests/test_memory.py checks these terms against saved-tensor hooks).
    `masked`: the shared-prefix mask of `rows` rows of `seq` tokens (core_attention_elements)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    norm = 1 if fused else 2  # tensors a norm keeps besides its output (the GEMM input)
    replicated = 2 * (norm + 1) * h
    sharded = q + f  # the out-projection and FC2 inputs
    if m.qk_layernorm:  # torch's composed norm: input and normalised tensor; K's input is a
        sharded += q + kv if fused else 3 * q + 3 * kv  # view of the whole QKV GEMM output
    attention, per_rank = core_attention_elements(m, tp, seq, rows, fused, masked)
    sharded += attention + (2 * f if fused else 4 * f)  # SwiGLU: fused, its input; else 2 more
    sp = m.sequence_parallel and tp > 1
    return (replicated / tp if sp else replicated) + sharded / tp + per_rank


def activation_bytes(
    m, layout: Layout, tokens: int, seq: int, fused: bool, masked: bool = False
) -> float:
    """Activations one microbatch of `tokens` (rows x seq) keeps on the stage with most, plus
    the backward working set (one layer's activations). `masked`: a shared-prefix microbatch,
    whose bool mask (block_mask's `[rows, 1, s, s]`) every layer reads."""
    tp, pp = layout.tp, layout.pp
    elem = 2 if m.bf16 else 4
    rows = tokens // seq
    full = layer_activation_elements(m, tp, seq, fused, masked, rows) * elem * tokens
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
        inputs = (m.num_attention_heads + 2 * m.num_query_groups) * d  # q + 2kv
        internals, per_rank = core_attention_elements(m, tp, seq, rows, fused, masked)
        kept = layers * (full - ((internals - inputs) / tp + per_rank) * elem * tokens) + full
    else:
        kept = layers * full
    mask = rows * seq * seq if masked else 0
    # 1F1B keeps up to PP microbatches in flight on the first stage.
    in_flight = pp if pp > 1 else 1
    return (kept + mask) * in_flight + full  # + the backward working set


def logits_bytes(m, tokens: int, v_local: float, ce_chunk: int) -> float:
    """The logits `[tokens, v/TP]` in the parameter dtype and the CE + entropy kernel's fp32
    `[chunk, v/TP]` buffer (entropy.py)."""
    elem = 2 if m.bf16 else 4
    return tokens * v_local * elem + min(ce_chunk, tokens) * v_local * 4


def fused_linear_bytes(m, tokens: int, v_local: float, chunk: int) -> float:
    """What fused_linear.py holds at the end of the NTP forward instead of the logits: one
    chunk's buffers (its logits in the weight's dtype, their fp32 copy unless that is fp32, the
    fp32 exp) and the gradients its forward makes for the training NTP loss (`expected_grad`):
    g @ W per token `[tokens, h]` and the output weight's `[v/TP, h]`, both in the weight's dtype
    until the backward."""
    elem = 2 if m.bf16 else 4
    buffers = min(chunk, tokens) * v_local * (elem + (4 if m.bf16 else 0) + 4)
    gradients = (tokens + v_local) * m.hidden_size * elem
    return buffers + gradients


def predict(
    m, layout: Layout, params: Params, work: Workload, *, gpu: bool, kl_beta: float = 0.0,
    vocab: int | None = None, ce_chunk: int = 1024, fused_linear_chunk: int = 0,
) -> Estimate:  # fmt: skip
    """The per-GPU (per-process on CPU) memory of a steady-state step, in bytes. `ce_chunk`:
    entropy_chunk_tokens; `fused_linear_chunk`: fused_linear_chunk_tokens (0: off)."""
    n = params.per_rank(m.num_layers, layout.tp, layout.pp)
    elem = 2 if m.bf16 else 4
    shard = layout.dp if layout.distributed_optimizer and layout.dp > 1 else 1
    optimizer = n * (12 if m.bf16 else 8) / shard
    ntp = activation_bytes(m, layout, work.ntp_tokens, m.seq_length, fused=gpu)
    rl_tokens = work.rl_rows * work.rl_length
    rl = 0.0
    if rl_tokens:
        rl = activation_bytes(m, layout, rl_tokens, work.rl_length, gpu, work.rl_masked)
    v_local = (vocab or m.vocab_size) / layout.tp
    if fused_linear_chunk:
        ntp_logits = fused_linear_bytes(m, work.ntp_tokens, v_local, fused_linear_chunk)
    else:
        ntp_logits = logits_bytes(m, work.ntp_tokens, v_local, ce_chunk)
    rl_projected = rl_tokens if work.rl_logit_tokens is None else work.rl_logit_tokens
    rl_logits = logits_bytes(m, rl_projected, v_local, ce_chunk) if rl_projected else 0.0
    return Estimate(
        weights=n * elem,
        grads=n * 4.0,
        optimizer=optimizer,
        reference=n * elem if kl_beta > 0 else 0.0,
        ntp_activations=ntp,
        rl_activations=rl,
        ntp_logits=ntp_logits,
        rl_logits=rl_logits,
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
        ("NTP logits", est.ntp_logits),
        ("RL logits", est.rl_logits),
        ("optimizer transient", est.optimizer_transient),
        ("runtime overhead", est.overhead),
        ("predicted peak", est.peak),
    ]
    return [(name, value / GIB) for name, value in rows]
