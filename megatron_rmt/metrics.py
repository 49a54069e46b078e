"""Per-step metrics: one readable console line, a JSONL file and TensorBoard, from one rank.

The trainer passes plain floats already reduced over data-parallel ranks; this module only
formats and writes them, so a crash never loses more than the current line (JSONL is flushed).
"""

import json
import math
import os
import time

CONSOLE_KEYS = (
    ("ntp_loss", "ntp {:.4f}"),
    ("rl_loss", "rl {:+.4f}"),
    ("reward", "reward {:.3f}"),
    ("match_acc", "acc {:.3f}"),
    ("response_len", "len {:.1f}"),
    ("budget", "B_t {:.0f}"),
    ("rl_tokens", "rl_tok {:.0f}"),
    ("ntp_tokens", "ntp_tok {:.0f}"),
    ("zero_adv_share", "zero_adv {:.2f}"),
    ("mixed_match_share", "mixed {:.2f}"),
    ("step_time", "{:.2f}s"),
)


class MetricsWriter:
    """Writes from the logging rank. A run resumed at step `start_step` first drops the rows of
    steps >= `start_step` that the killed run had written after its checkpoint (it replays
    them): the JSONL file is rewritten atomically and TensorBoard purges them, so each step has
    exactly one row (a run from step 0 starts the file afresh)."""

    def __init__(
        self,
        enabled: bool,
        jsonl_path: str | None,
        tensorboard_dir: str | None,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            drop_rows_from(jsonl_path, start_step)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir, purge_step=start_step or None)

    def write(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            parts = [fmt.format(metrics[k]) for k, fmt in CONSOLE_KEYS if k in metrics]
            print(f"step {step:>6} | " + " | ".join(parts), flush=True)
        if self._jsonl:
            record = {"step": step, "time": time.time(), **metrics}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def drop_rows_from(path: str, step: int) -> None:
    """Rewrite the JSONL metrics file `path` without its rows of steps >= `step` (and without a
    line a crash cut short), atomically; nothing happens when there is nothing to drop."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return
    kept = [line for line in lines if (s := _step_of(line)) is not None and s < step]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def step_metrics(
    *,
    ntp,
    rl,
    scored,
    zero_groups,
    ntp_time,
    flops_per_token,
    budget,
    probs,
    grad_norm,
    lr,
    failed,
    invalid,
    dropped,
    rollout_latency,
    step_time,
    window_tokens,
    flops,
    rl_time=0.0,
    sync_time=0.0,
    ahead=None,
) -> dict[str, float]:
    """The step's metrics, summed over data-parallel replicas, then turned into means.

    `failed`: every rollout request failed, the step
    trained NTP only; `dropped`: requests that
    failed (the step trained without them); `invalid`: rollout replies rejected (both from
    `dispatch.StepRollouts`); a non-finite `grad_norm` means the optimizer step was skipped
    (`build.Trainable.optimizer_step`). `rl_time` and `sync_time` are the RL update's and the
    weight sync's seconds (loop.finish_step); `ahead` (ahead.Source) says which step's positions
    the RL term trained on (its served groups: `rl_positions`, `entropy_chosen`) and how many
    results were refused as stale.

    Every rank calls this (it all-reduces); only the logging rank writes the result."""
    from megatron_rmt import parallel

    trained = ahead.groups if ahead is not None else []  # post-training: no positions
    local = {  # sums over this replica; summed again over DP below
        "ntp_sum": ntp.ntp_loss_sum,
        "ntp_tok": ntp.ntp_tokens,
        "ent_sum": ntp.entropy_sum,
        "ent_n": ntp.entropy_count,
        "rl_sum": rl.loss_sum,
        "rl_tok": rl.tokens,
        "gap_sum": rl.logprob_gap_sum,
        "kl_sum": rl.kl_sum,
        "reward": float(scored.rewards.sum()),
        "match": float(scored.match.sum()),
        "length": float(scored.length.sum()),
        "hits": float((scored.match == 1).sum()),
        "mixed": float(mixed_groups(scored.match)),
        "resp_len": float(scored.response_tokens.sum()),
        "think_len": float(scored.think_tokens.sum()),
        "unparsed": float(scored.unparsed.sum()),
        "samples": scored.rewards.numel(),
        "groups": scored.rewards.shape[0],
        "zero": zero_groups,
        "ent_chosen": sum(g.problem.entropy for g in trained),
        "chosen": len(trained),
        "failed": float(failed),
        "invalid": float(invalid),
        "dropped": float(dropped),
        "win_tok": window_tokens,
        "latency": rollout_latency,
        "step_s": step_time,
        "ntp_s": ntp_time,
        "rl_s": rl_time,
        "sync_s": sync_time,
        "tis_sum": rl.tis_ratio_sum,
        "tis_capped": rl.tis_capped,
        "stale": float(ahead.stale) if ahead is not None else 0.0,
        "replicas": 1.0,
        **flops,  # compute.step_flops: this replica's
    }
    g = dict(zip(local, parallel.all_reduce_sum_dp(list(local.values())), strict=True))
    dp = g["replicas"]

    def mean(a, b):
        return a / b if b else 0.0

    return {
        "ntp_loss": mean(g["ntp_sum"], g["ntp_tok"]),
        "rl_loss": mean(g["rl_sum"], rl.total_count),
        "kl": mean(g["kl_sum"], rl.total_count),  # KL(pi || pi_ref) estimate, 0 without KL
        "reward": mean(g["reward"], g["samples"]),
        "reward_match": mean(g["match"], g["samples"]),
        "reward_length": mean(g["length"], g["samples"]),
        "match_acc": mean(g["hits"], g["samples"]),
        "response_len": mean(g["resp_len"], g["samples"]),
        "think_len": mean(g["think_len"], g["samples"]),
        "budget": float(budget) if budget is not None else 0.0,
        "p_easy": probs[0],
        "p_medium": probs[1],
        "p_hard": probs[2],
        "rl_tokens": rl.total_tokens,  # response tokens in L_RL over all DP ranks
        "rl_tokens_trained": g["rl_tok"],  # of those, in groups with a nonzero advantage
        "ntp_tokens": g["ntp_tok"],
        "rl_positions": g["chosen"],
        "zero_adv_share": mean(g["zero"], g["groups"]),
        "mixed_match_share": mean(g["mixed"], g["groups"]),  # groups GRPO's match signal reaches
        "unparsed_share": mean(g["unparsed"], g["samples"]),
        "entropy_chosen": mean(g["ent_chosen"], g["chosen"]),
        "entropy_all": mean(g["ent_sum"], g["ent_n"]),
        "logprob_gap": mean(g["gap_sum"], g["rl_tok"]),
        "rollout_latency": g["latency"] / dp,  # the wait for rollouts after the NTP pass
        "rollout_failed": g["failed"],
        "rollout_dropped": g["dropped"],  # requests the step trained without
        "rollout_invalid": g["invalid"],  # replies rejected (NaN, foreign ids, too long, ...)
        "tokens_per_s": mean(g["win_tok"] + g["rl_tok"], g["step_s"] / dp),
        "step_time": g["step_s"] / dp,
        "ntp_pass_time": g["ntp_s"] / dp,
        "rl_time": g["rl_s"] / dp,  # the RL update: reference pass, GRPO forward and backward
        "sync_time": g["sync_s"] / dp,  # pushing the new weights to the rollout engine
        "tis_ratio": mean(g["tis_sum"], g["rl_tok"]),  # mean pi_trainer / pi_sampler (tis_cap)
        "tis_capped_share": mean(g["tis_capped"], g["rl_tok"]),  # of tokens, ratio above C
        "rollout_stale": g["stale"],  # results refused: sampled too many versions behind
        **_source(ahead),
        "grad_norm": grad_norm,
        "skipped_step": float(not math.isfinite(grad_norm)),  # no update: non-finite gradients
        "lr": lr,
        "flops_ntp": g["flops_ntp"],  # over all replicas (compute.py's accounting)
        "flops_rl": g["flops_rl"],
        "flops_rollout": g["flops_rollout"],
        "flops": g["flops_ntp"] + g["flops_rl"] + g["flops_rollout"],
    } | _mfu(flops_per_token * g["win_tok"], g["ntp_s"] / dp)


def mixed_groups(match) -> int:
    """Groups (rows of `match`, [n, G]) with both an exact hit and a miss: the only ones whose
    advantages carry the match reward; in the others only the length term differs."""
    hit = match == 1
    return int((hit.any(dim=1) & ~hit.all(dim=1)).sum())


def _source(ahead) -> dict[str, float]:
    """RMT training: the step whose chosen positions the RL term trained on (-1: none)."""
    return {} if ahead is None else {"rl_from_step": float(ahead.step)}


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def _mfu(flops: float, seconds: float) -> dict[str, float]:
    """MFU of the NTP pass on GPUs whose peak is known; nothing on CPU."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or seconds <= 0:
        return {}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        return {}
    return {"mfu_ntp": flops / (seconds * peak * 1e12 * dist.get_world_size())}
