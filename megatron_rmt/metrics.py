"""Per-step metrics: one readable console line, a JSONL file and TensorBoard, from one rank.

The trainer passes plain floats already reduced over data-parallel ranks; this module only
formats and writes them, so a crash never loses more than the current line (JSONL is flushed).
"""

import json
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
    ("step_time", "{:.2f}s"),
)


class MetricsWriter:
    def __init__(self, enabled: bool, jsonl_path: str | None, tensorboard_dir: str | None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)

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


def step_metrics(
    *,
    ntp,
    rl,
    scored,
    zero_groups,
    total_rl_count,
    rl_tokens,
    budget,
    probs,
    grad_norm,
    lr,
    failed,
    rollout_latency,
    step_time,
    window_tokens,
) -> dict[str, float]:
    """The step's metrics, summed over data-parallel replicas, then turned into means.

    Every rank calls this (it all-reduces); only the logging rank writes the result."""
    from megatron_rmt import parallel

    n_problems = len(ntp.problems)
    sums = parallel.all_reduce_sum_dp(
        [
            ntp.ntp_loss_sum,
            ntp.ntp_tokens,
            ntp.entropy_sum,
            ntp.entropy_count,
            rl.loss_sum,
            rl.tokens,
            rl.logprob_gap_sum,
            float(scored.rewards.sum()),
            float(scored.match.sum()),
            float(scored.length.sum()),
            float((scored.match == 1).sum()),
            float(scored.response_tokens.sum()),
            float(scored.think_tokens.sum()),
            float(scored.unparsed.sum()),
            scored.rewards.numel(),
            scored.rewards.shape[0],
            zero_groups,
            sum(p.entropy for p in ntp.problems),
            n_problems,
            float(failed),
            window_tokens,
            rollout_latency,
            step_time,
        ]
    )
    (
        ntp_sum,
        ntp_tok,
        ent_sum,
        ent_n,
        rl_sum,
        rl_tok,
        gap_sum,
        rew,
        match,
        length,
        hits,
        resp_len,
        think_len,
        unparsed,
        samples,
        groups,
        zero,
        ent_chosen,
        chosen,
        failed_n,
        win_tok,
        latency,
        step_s,
    ) = sums
    dp = parallel.all_reduce_sum_dp([1.0])[0]

    def mean(a, b):
        return a / b if b else 0.0

    return {
        "ntp_loss": mean(ntp_sum, ntp_tok),
        "rl_loss": mean(rl_sum, total_rl_count),
        "reward": mean(rew, samples),
        "reward_match": mean(match, samples),
        "reward_length": mean(length, samples),
        "match_acc": mean(hits, samples),
        "response_len": mean(resp_len, samples),
        "think_len": mean(think_len, samples),
        "budget": float(budget) if budget is not None else 0.0,
        "p_easy": probs[0],
        "p_medium": probs[1],
        "p_hard": probs[2],
        "rl_tokens": rl_tokens,  # response tokens in L_RL over all DP ranks
        "rl_tokens_trained": rl_tok,  # of those, in groups with a nonzero advantage
        "ntp_tokens": ntp_tok,
        "rl_positions": chosen,
        "zero_adv_share": mean(zero, groups),
        "unparsed_share": mean(unparsed, samples),
        "entropy_chosen": mean(ent_chosen, chosen),
        "entropy_all": mean(ent_sum, ent_n),
        "logprob_gap": mean(gap_sum, rl_tok),
        "rollout_latency": latency / dp,
        "rollout_failed": failed_n,
        "tokens_per_s": mean(win_tok + rl_tok, step_s / dp),
        "step_time": step_s / dp,
        "grad_norm": grad_norm,
        "lr": lr,
    }
