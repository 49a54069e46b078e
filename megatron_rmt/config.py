"""One typed, frozen configuration tree for a run, parsed from Megatron-LM-style flags and YAML.

Sources, later wins: the dataclass defaults, then `--config FILE.yaml` (sections named like the
dataclasses below: `model:`, `parallel:`, ...), then command-line flags. Every field's flag is its
name with dashes (`hidden_size` -> `--hidden-size`), which is Megatron-LM's flag wherever Megatron-LM
has one. Everything is validated before any process group starts, with messages that say which
key in which file was wrong and what was expected.
"""

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from megatron_rmt.variants import VARIANTS


class UserError(Exception):
    """A problem with what the user gave (flags, config, data, directories), not a bug: the
    entry points print its one-line message and exit 2, without a traceback (`run_cli`)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, explained for the person who wrote the config."""


def run_cli(main, argv: list[str]) -> None:
    """An entry point's `__main__`: `main(argv)`; a UserError becomes `error: ...` on stderr
    and exit status 2. Any other exception is a bug and keeps its traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _f(default, help: str, choices=None):
    kind = "default_factory" if isinstance(default, list) else "default"
    value = (lambda: list(default)) if kind == "default_factory" else default
    return field(**{kind: value}, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    model_family: str = _f("qwen3", "architecture family", ("qwen3", "qwen2", "llama"))
    num_layers: int = _f(2, "transformer layers")
    hidden_size: int = _f(64, "model width")
    ffn_hidden_size: int = _f(176, "SwiGLU inner width")
    num_attention_heads: int = _f(4, "query heads")
    num_query_groups: int = _f(2, "key/value heads (GQA groups)")
    kv_channels: int | None = _f(None, "head dimension (default hidden/heads)")
    seq_length: int = _f(128, "tokens per training sample")
    max_position_embeddings: int = _f(40960, "longest sequence RoPE is set up for")
    vocab_size: int | None = _f(None, "padded vocabulary (default: tokenizer's, padded)")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this x TP")
    rotary_base: int = _f(1_000_000, "RoPE base")
    norm_epsilon: float = _f(1e-6, "RMSNorm epsilon")
    untie_embeddings_and_output_weights: bool = _f(True, "separate output layer")
    init_method_std: float = _f(0.02, "std of random initialisation")
    attention_dropout: float = _f(0.0, "attention dropout")
    hidden_dropout: float = _f(0.0, "hidden dropout")
    bf16: bool = _f(False, "bf16 parameters and compute (GPU)")
    transformer_impl: str = _f(
        "auto", "layer implementation", ("auto", "local", "transformer_engine")
    )
    # How the RL pass lays out a group (model/shared_prefix.py)
    rl_layout: str = _f(
        "rows",
        "RL pass layout: rows (prompt + response per row) or shared_prefix (one row per group, "
        "the prompt once; the layer spec's core attention then applies an explicit mask)",
        ("rows", "shared_prefix"),
    )
    # Memory and speed features, named as Megatron-LM's flags (docs/memory.md).
    recompute_granularity: str | None = _f(
        None, "activation recompute: whole layers or core attention only", ("full", "selective")
    )
    recompute_method: str | None = _f(
        None, "full recompute: which layers (uniform groups or the first N)", ("uniform", "block")
    )
    recompute_num_layers: int | None = _f(None, "full recompute: layers per group / recomputed")
    sequence_parallel: bool = _f(False, "shard norm/dropout activations over TP (needs TP > 1)")
    gradient_accumulation_fusion: bool = _f(False, "fused wgrad GEMM into main_grad (GPU)")
    apply_rope_fusion: bool = _f(False, "fused RoPE kernel (GPU, Transformer Engine)")

    @property
    def qk_layernorm(self) -> bool:
        return self.model_family == "qwen3"

    @property
    def add_qkv_bias(self) -> bool:
        return self.model_family == "qwen2"


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "TP degree")
    pipeline_model_parallel_size: int = _f(1, "PP degree")
    use_distributed_optimizer: bool = _f(True, "shard optimizer state over DP (when DP > 1)")
    seed: int = _f(1234, "random seed")
    distributed_timeout_minutes: int = _f(
        10, "collective timeout; must outlast the longest wait on the rollout service"
    )
    overlap_grad_reduce: bool = _f(False, "overlap the DP gradient reduce with the RL backward")
    overlap_param_gather: bool = _f(
        False, "overlap the parameter all-gather with the next forward (distributed optimizer)"
    )


@dataclass(frozen=True)
class DataConfig:
    data_path: list[str] = _f([], "indexed dataset prefixes, optionally weighted: W1 P1 W2 P2")
    split: str = _f("969,30,1", "train,valid,test proportions")
    decay_data_path: list[str] = _f([], "blend for the decay phase of the WSD schedule")
    prompt_data: str | None = _f(None, "post-training: JSONL of math problems with answers")
    tokenizer_type: str = _f(
        "HuggingFaceTokenizer", "tokenizer kind", ("HuggingFaceTokenizer", "GPT2BPETokenizer")
    )
    tokenizer_model: str | None = _f(None, "HF tokenizer directory")
    vocab_file: str | None = _f(None, "GPT-2 vocab.json")
    merge_file: str | None = _f(None, "GPT-2 merges.txt")
    eod_token: str = _f(
        "endoftext",
        "document separator the shards use: <|endoftext|> (ours) or eos_token (Megatron-LM's)",
        ("endoftext", "eos"),
    )
    micro_batch_size: int = _f(1, "sequences per microbatch")
    global_batch_size: int = _f(8, "sequences per optimizer step, all DP ranks")
    data_cache_path: str | None = _f(None, "where dataset index caches are written")


@dataclass(frozen=True)
class OptimConfig:
    train_iters: int = _f(10, "optimizer steps T")
    lr: float = _f(1e-6, "peak learning rate")
    min_lr: float = _f(0.0, "final learning rate of decaying schedules")
    lr_decay_style: str = _f("constant", "LR schedule", ("constant", "cosine", "WSD"))
    lr_warmup_iters: int = _f(0, "linear warm-up steps")
    lr_wsd_decay_iters: int | None = _f(None, "length of the decay phase (WSD)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.95, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    clip_grad: float = _f(1.0, "gradient norm clip (0 disables)")


@dataclass(frozen=True)
class RMTConfig:
    rmt_variant: str = _f("rmt", "method variant (paper ablations and baselines)", tuple(VARIANTS))
    entropy_thresholds: list[float] = _f([0.5, 1.0, 1.5], "easy/medium/hard cut-offs in nats")
    bucket_mode: str = _f("fixed", "fixed thresholds or per-batch quantiles", ("fixed", "quantile"))
    min_context: int = _f(16, "document tokens a position needs before it to be a candidate")
    positions_per_sequence: int = _f(1, "RL positions chosen per position_unit")
    position_unit: str = _f(
        "document",
        "what positions_per_sequence counts per: each document of a packed window (the paper) "
        "or the whole window",
        ("document", "window"),
    )
    curriculum_start: list[float] = _f([0.5, 0.4, 0.1], "p(easy, medium, hard) before t1")
    curriculum_end: list[float] = _f([0.1, 0.3, 0.6], "p(easy, medium, hard) after t2")
    curriculum_t1: float = _f(0.3, "curriculum start of transition, fraction of T")
    curriculum_t2: float = _f(0.7, "curriculum end of transition, fraction of T")
    budget_initial: int = _f(800, "B_0, thinking tokens asked for at step 0")
    budget_min: int = _f(1, "B_min")
    budget_gamma: float = _f(0.2, "budget decay factor gamma")
    length_reward_weight: float = _f(0.1, "w in r = (1-w) r_match + w r_len")
    length_reward_max: float = _f(1.0, "r_max of the length reward")
    match_fold_case: bool = _f(False, "r_match ignores case ('paris' matches ' Paris')")
    ntp_weight: float = _f(0.1, "lambda in L = L_RL + lambda L_NTP")
    group_size: int = _f(8, "G responses per chosen position")
    rollout_temperature: float = _f(1.0, "sampling temperature; 0: greedy (evaluation, vLLM only)")
    rollout_top_p: float = _f(1.0, "nucleus sampling p")
    max_response_tokens: int = _f(2048, "sampling cap; must exceed 2*B_0 plus the answer")
    response_cap: str = _f(
        "fixed",
        "fixed: every response may use max_response_tokens (the paper); budget: at most "
        "2*B_t + answer_tokens (cheaper, but a correct answer after a longer think scores 0)",
        ("fixed", "budget"),
    )
    answer_tokens: int = _f(16, "room after </think> for the boxed answer")
    kl_beta: float = _f(0.0, "KL penalty weight beta")
    kl_estimator: str = _f("k3", "KL estimator", ("k1", "k3"))
    clip_eps: float | None = _f(None, "PPO ratio clip against rollout log-probs (off if unset)")
    tis_cap: float | None = _f(
        None,
        "truncated importance sampling: weight each response token's policy gradient by "
        "min(pi_trainer / pi_sampler, C) at this C (off if unset; docs/rollout.md)",
    )
    loss_aggregation: str = _f("token", "policy-loss aggregation", ("token", "sequence"))
    advantage_delta: float = _f(1e-6, "delta in A = (r - mean) / (std + delta)")
    prompt_template: str = _f("ntr_base", "next-token-reasoning template name")
    rpt_entropy_threshold: float = _f(0.5, "RPT: train on every candidate with entropy >= this")
    rpt_max_positions: int = _f(0, "RPT: at most this many positions per position_unit (0: all)")
    entropy_chunk_tokens: int = _f(1024, "tokens per chunk of the fused CE+entropy")
    # The output projection fused into the NTP pass's CE + entropy (fused_linear.py)
    fused_linear_chunk_tokens: int = _f(
        0,
        "NTP pass: project, CE and entropy this many tokens at a time, never holding the whole "
        "logits (0: off, the output layer's logits and the fused CE + entropy)",
    )
    rl_micro_batch_rows: int | None = _f(
        None, "rows per RL microbatch (default: a whole group of G), each padded to its own length"
    )


@dataclass(frozen=True)
class RolloutConfig:
    rollout_url: list[str] = _f([], "vLLM servers; empty uses the embedded engine")
    rollout_timeout: float = _f(120.0, "seconds per request")
    rollout_retries: int = _f(3, "retries before a step goes NTP-only")
    rollout_max_concurrency: int = _f(16, "requests in flight per trainer replica")
    weight_sync_interval: int = _f(1, "push weights to the service every k steps")
    rollout_ahead: int = _f(
        0,
        "1: one-step-ahead rollouts, the positions step t chooses are sampled while the "
        "trainer finishes step t and runs step t+1's NTP pass, and train in step t+1's RL "
        "term (docs/rollout.md); 0: on-policy, in their own step",
        (0, 1),
    )
    weight_sync_dir: str | None = _f(None, "directory the service reads synced weights from")
    weight_transfer: str = _f(
        "disk",
        "how weights reach the servers: files, or in memory (shm: a server on this host)",
        ("disk", "gloo", "shm", "nccl"),
    )
    weight_transfer_address: str | None = _f(
        None, "this host's address the servers reach (default: the route to each server)"
    )
    weight_transfer_bucket_mb: int = _f(
        1024,
        "MiB of weights per bucket: one /update_weights call in memory (gloo), vLLM's packed "
        "buffer (nccl), one safetensors file per stage (disk)",
    )


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = _f(None, "checkpoint directory to write")
    load: str | None = _f(None, "checkpoint directory to resume or start from")
    save_interval: int | None = _f(None, "save every N steps (and at the end)")
    no_load_optim: bool = _f(False, "load weights only (start of a new run from a checkpoint)")
    ref_load: str | None = _f(None, "KL reference weights (default: the run's starting weights)")
    keep_last_n_checkpoints: int | None = _f(None, "after a save, delete all but the newest N")
    async_save: bool = _f(False, "write checkpoints in the background (published when done)")


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = _f(1, "steps between console lines")
    tensorboard_dir: str | None = _f(None, "TensorBoard event directory")
    metrics_file: str | None = _f(None, "JSONL metrics file")
    dry_run: bool = _f(False, "build the model on the meta device, print predicted memory, exit")


@dataclass(frozen=True)
class ColdStartConfig:
    """The format cold start (`python -m megatron_rmt.coldstart`, docs/coldstart.md)."""

    coldstart_per_level: int = _f(64, "training positions drawn per difficulty level")
    coldstart_candidates: int = _f(48, "most probable tokens the think text may list")
    coldstart_budgets: list[int] = _f([], "B range [low, high] (default: the run's B_T..B_0)")
    coldstart_free_share: float = _f(0.25, "share of examples without the budget sentence")
    coldstart_restate_tokens: int = _f(0, "text tokens the think restates before the guess")
    coldstart_epochs: int = _f(1, "passes over the examples")
    coldstart_max_steps: int | None = _f(None, "stop after this many steps (a FLOPs budget)")
    coldstart_max_documents: int | None = _f(None, "read at most this many training documents")
    coldstart_think: str = _f(
        "candidates", "think text: list the candidates, restate the text's end then guess, or "
        "guess first (repeated to fill B), or the guess and a fixed phrase",
        ("candidates", "restate", "guess_first", "guess_phrase"),
    )  # fmt: skip
    coldstart_exact_box: bool = _f(False, "box the guess token itself (its leading space kept)")
    coldstart_ntp_windows: int = _f(0, "training windows of plain NTP mixed into every step")
    coldstart_ntp_weight: float = _f(1.0, "weight of that NTP term (each term per-token mean)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rmt: RMTConfig = field(default_factory=RMTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    coldstart: ColdStartConfig = field(default_factory=ColdStartConfig)

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    @property
    def num_microbatches(self) -> int:
        d = self.data
        return d.global_batch_size // (d.micro_batch_size * self.data_parallel_size)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def parse(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """Build and validate the run's Config from `--config FILE.yaml` and flags."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = {name: {} for name in SECTIONS}
    for path in args.config:
        _merge_yaml(values, path)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if getattr(args, f.name, None) is not None:
                values[section][f.name] = getattr(args, f.name)
    cfg = Config(**{s: SECTIONS[s](**v) for s, v in values.items()})
    validate(cfg, world_size if world_size is not None else cfg.world_size)
    return cfg


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Reinforcement Mid-Training on Megatron-Core",
        argument_default=None,
    )
    parser.add_argument(
        "--config", nargs="+", default=[], help="YAML presets, later ones win; flags override all"
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            base, _ = _base_type(f.type)
            flag = "--" + f.name.replace("_", "-")
            kw = {"dest": f.name, "help": f.metadata["help"], "default": None}
            if f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
            if base is bool and flag.startswith("--no-"):  # Megatron's --no-load-optim style
                group.add_argument(flag, action="store_const", const=True, **kw)
            elif base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif base is list:
                item = typing.get_args(f.type)[0]
                group.add_argument(flag, nargs="+", type=item, **kw)
            else:
                group.add_argument(flag, type=base, **kw)
    return parser


def _base_type(tp) -> tuple[type, bool]:
    """(the field's value type, whether None is allowed)."""
    if isinstance(tp, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return typing.get_origin(tp) or tp, False


def _merge_yaml(values: dict, path: str) -> None:
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
    for section, body in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section '{section}' (known: {sorted(SECTIONS)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for key, value in body.items():
            key = key.replace("-", "_")
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key '{section}.{key}' (known: {sorted(fields)})"
                )
            values[section][key] = _check_type(f"{path}: {section}.{key}", fields[key], value)


def _check_type(where: str, f: dataclasses.Field, value):
    base, optional = _base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    if base is list:
        item = typing.get_args(f.type)[0]
        value = value if isinstance(value, list) else [value]
        return [_scalar(where, item, v) for v in value]
    value = _scalar(where, base, value)
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise ConfigError(f"{where}: '{value}' is not one of {list(f.metadata['choices'])}")
    return value


def _scalar(where: str, base: type, value):
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # data paths and weights may look numeric
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: expected {base.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def validate(cfg: Config, world_size: int) -> None:
    """Reject configurations that would fail later, inside a process group or hours in."""
    m, p, d, o, r = cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.rmt
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    problems = []
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
    if m.num_attention_heads % tp:
        problems.append(f"num_attention_heads {m.num_attention_heads} not divisible by TP {tp}")
    if m.num_query_groups % tp:
        problems.append(f"num_query_groups {m.num_query_groups} not divisible by TP {tp}")
    if m.num_attention_heads % m.num_query_groups:
        problems.append("num_attention_heads must be a multiple of num_query_groups")
    if m.num_layers % pp:
        problems.append(f"num_layers {m.num_layers} not divisible by PP {pp}")
    dp = max(world_size // (tp * pp), 1)
    if d.global_batch_size % (d.micro_batch_size * dp):
        problems.append(
            f"global_batch_size {d.global_batch_size} not divisible by "
            f"micro_batch_size {d.micro_batch_size} x DP {dp}"
        )
    if r.rmt_variant not in ("ntp", "rpt", "no_dtb"):
        need = 2 * r.budget_initial + r.answer_tokens
        if r.max_response_tokens < need:  # either cap: Eq. 2 rewards thinks up to 2 B_0 long
            problems.append(
                f"max_response_tokens {r.max_response_tokens} is below 2*B_0 + answer_tokens = "
                f"{need}: answers after a think Eq. 2 still rewards would be truncated"
            )
    problems += _validate_rmt(r)
    problems += _validate_scale(cfg, dp)
    problems += _validate_rollout(cfg.rollout, cfg.parallel.distributed_timeout_minutes)
    if cfg.rollout.weight_sync_interval < 1:
        problems.append("weight_sync_interval must be at least 1")
    if cfg.rollout.weight_transfer_bucket_mb < 1:
        problems.append("weight_transfer_bucket_mb must be at least 1 (MiB)")
    if r.rollout_temperature < 0 or (r.rollout_temperature == 0 and not cfg.rollout.rollout_url):
        problems.append(
            f"rollout_temperature {r.rollout_temperature}: must be > 0 (0, greedy decoding, needs "
            "a vLLM server, --rollout-url; the embedded engine only samples)"
        )
    stop = cfg.coldstart.coldstart_max_steps
    if stop is not None and stop < 1:
        problems.append("coldstart_max_steps must be at least 1 (unset: every step)")
    if o.lr_decay_style == "WSD" and not o.lr_wsd_decay_iters:
        problems.append("lr_decay_style WSD needs lr_wsd_decay_iters")
    if d.tokenizer_type == "HuggingFaceTokenizer" and d.data_path and not d.tokenizer_model:
        problems.append("tokenizer_type HuggingFaceTokenizer needs --tokenizer-model DIR")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def require_sampling(r: RMTConfig) -> None:
    """The training entry points (RMT, post-training): the RL loss recomputes the sampler's
    log-probs at its temperature, so greedy decoding (0), which evaluation may use, is refused."""
    if r.rollout_temperature == 0:
        raise ConfigError(
            "--rollout-temperature 0 (greedy) is for evaluation: the RL loss needs the log-probs "
            "of a sampling temperature > 0"
        )


def _validate_rollout(ro: RolloutConfig, timeout_minutes: int) -> list[str]:
    problems = []
    if ro.rollout_url and ro.weight_transfer == "disk" and not ro.weight_sync_dir:
        problems.append(
            "--rollout-url needs --weight-sync-dir (a directory the servers can read) or "
            "--weight-transfer gloo|shm|nccl"
        )
    wait = ro.rollout_timeout * (ro.rollout_retries + 1)
    if ro.rollout_url and wait + 30 > 60 * timeout_minutes:
        problems.append(
            f"rollout_timeout x (rollout_retries + 1) = {wait:.0f} s must stay 30 s below "
            f"distributed_timeout_minutes ({timeout_minutes} min): ranks wait in a collective "
            "while rank 0 waits on the servers"
        )
    return problems


def _validate_rmt(r: RMTConfig) -> list[str]:
    problems = []
    th = r.entropy_thresholds
    if len(th) != 3 or not th[0] < th[1] < th[2]:
        problems.append(f"entropy_thresholds must be 3 increasing values, got {th}")
    for name in ("curriculum_start", "curriculum_end"):
        p = getattr(r, name)
        if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
            problems.append(f"{name} must be 3 non-negative probabilities summing to 1, got {p}")
    if not 0 <= r.curriculum_t1 < r.curriculum_t2 <= 1:
        problems.append("need 0 <= curriculum_t1 < curriculum_t2 <= 1")
    if not 1 <= r.budget_min <= r.budget_initial:
        problems.append("need 1 <= budget_min <= budget_initial")
    if not 0 < r.budget_gamma <= 1:
        problems.append("budget_gamma must be in (0, 1]")
    if r.group_size < 2:
        problems.append("group_size must be at least 2 (GRPO compares samples in a group)")
    if r.positions_per_sequence < 1:
        problems.append("positions_per_sequence must be at least 1")
    if r.rpt_max_positions < 0:
        problems.append("rpt_max_positions must be >= 0 (0: every position RPT's filter keeps)")
    if r.fused_linear_chunk_tokens < 0:
        problems.append("fused_linear_chunk_tokens must be >= 0 (0: off)")
    if r.tis_cap is not None and not r.tis_cap > 0:
        problems.append(f"tis_cap must be > 0 (or unset: off), got {r.tis_cap}")
    return problems


def _validate_scale(cfg: Config, dp: int) -> list[str]:
    """The memory and overlap features: combinations Megatron-Core would reject or mis-run."""
    m, p, c = cfg.model, cfg.parallel, cfg.checkpoint
    problems = []
    layers_per_stage = m.num_layers // max(p.pipeline_model_parallel_size, 1)
    if m.recompute_granularity == "full":
        if m.recompute_method is None or not m.recompute_num_layers:
            problems.append(
                "recompute_granularity full needs recompute_method (uniform or block) and "
                "recompute_num_layers >= 1"
            )
        elif m.recompute_num_layers > layers_per_stage:
            problems.append(
                f"recompute_num_layers {m.recompute_num_layers} exceeds the {layers_per_stage} "
                "layers of a pipeline stage"
            )
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        problems.append(
            "recompute_method / recompute_num_layers apply only to recompute_granularity full"
        )
    if m.sequence_parallel and p.tensor_model_parallel_size < 2:
        problems.append("sequence_parallel needs tensor_model_parallel_size > 1")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and dp > 1):
        problems.append(
            "overlap_param_gather needs the distributed optimizer: use_distributed_optimizer "
            "with DP > 1"
        )
    if m.sequence_parallel and m.seq_length % p.tensor_model_parallel_size:
        problems.append(
            f"sequence_parallel needs seq_length {m.seq_length} divisible by TP "
            f"{p.tensor_model_parallel_size}"
        )
    if p.distributed_timeout_minutes < 1:
        problems.append("distributed_timeout_minutes must be at least 1")
    rows = cfg.rmt.rl_micro_batch_rows
    if rows is not None and rows < 1:
        problems.append("rl_micro_batch_rows must be at least 1 (unset: one group per microbatch)")
    if rows is not None and m.rl_layout == "shared_prefix":
        problems.append("rl_micro_batch_rows splits rows of the rows layout; shared_prefix has one")
    # model/logits.py refuses both under SP: the output layer's input is then a sequence shard.
    if m.sequence_parallel and m.rl_layout == "shared_prefix":
        problems.append(
            "rl_layout shared_prefix needs sequence_parallel off (its RL pass projects only the "
            "response positions, which SP splits over TP)"
        )
    if m.sequence_parallel and cfg.rmt.fused_linear_chunk_tokens:
        problems.append(
            "fused_linear_chunk_tokens needs sequence_parallel off (it projects the final hidden "
            "states, which SP splits over TP)"
        )
    if c.keep_last_n_checkpoints is not None and c.keep_last_n_checkpoints < 1:
        problems.append("keep_last_n_checkpoints must be at least 1 (unset: keep all)")
    return problems


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml_text(text: str) -> Config:
    """Rebuild a Config saved with a checkpoint."""
    doc = yaml.safe_load(text)
    return Config(**{s: SECTIONS[s](**doc.get(s, {})) for s in SECTIONS})
