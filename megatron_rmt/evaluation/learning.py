"""Learning statistics of one training run from its metrics JSONL (one object per step, as
`--metrics-file` writes them): did reward, match accuracy, thinking length, ... change between
the first and the last quarter of the steps, and how closely did thinking follow the budget B_t?

    python -m megatron_rmt.evaluation.learning runs/tiny_cpu/metrics.jsonl [--json stats.json]
        [--keys reward,match_acc,think_len] [--against OTHER.jsonl --against-keys reward,ntp_loss]

prints a markdown table: per metric, the mean over the first and the last quarter of the steps,
last - first with a 95% Welch interval (steps as samples, Student t with Welch-Satterthwaite
degrees of freedom), then the mean budget deviation |think_len - B_t| / B_t per quarter.
`--json` also writes everything, the per-step budget deviation included.

Which values count: a step with no RL positions (`rl_positions` 0: the NTP-only variant, or a
failed rollout) has no reward, match accuracy, lengths, entropy of the chosen positions, ...;
a step without a budget logs B_t = 0 and has neither B_t nor a budget deviation; a step with no
NTP tokens has no NTP loss. Such values are left out, not counted as 0. A step logged twice (a
resumed run appends) counts once, with its last record.

`--against OTHER.jsonl`: per metric of `--against-keys` (default ntp_loss), the mean over the
steps both runs define of this run's value minus the other's, with a t interval over those
per-step differences (`paired`): runs that read the same windows in the same order.

Quarters: with n steps and q = ceil(n / 4), the first quarter is the first q steps, the last
quarter the last q, and the steps between are halved into the second and third. n = 1 has only
a first quarter; a quarter needs 2 values for an interval.
"""

import argparse
import json
import math
import sys

from megatron_rmt.jsonl import InputError, records

# Metrics defined only on steps that trained RL positions.
RL_KEYS = frozenset(
    {
        "reward",
        "reward_match",
        "reward_length",
        "match_acc",
        "response_len",
        "think_len",
        "zero_adv_share",
        "mixed_match_share",
        "unparsed_share",
        "entropy_chosen",
        "rl_loss",
        "logprob_gap",
        "kl",
    }
)
BUDGET_DEV = "budget_dev"  # |think_len - B_t| / B_t, derived per step
DEFAULT_KEYS = (
    "reward",
    "match_acc",
    "think_len",
    "response_len",
    "budget",
    BUDGET_DEV,
    "entropy_chosen",
    "ntp_loss",
    "unparsed_share",
    "zero_adv_share",
    "mixed_match_share",
)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL, one per step (the last of a repeated step), by step."""
    by_step = {}
    for number, record in records(path):
        step = record.get("step")
        if not isinstance(step, int | float) or isinstance(step, bool):
            raise InputError(f"{path}:{number}: no numeric 'step' field")
        by_step[int(step)] = record
    return [by_step[step] for step in sorted(by_step)]


def value(record: dict, key: str) -> float | None:
    """The step's value of `key`, or None where it is missing or undefined (see the module
    docstring)."""
    if key == BUDGET_DEV:
        think, budget = value(record, "think_len"), value(record, "budget")
        return None if think is None or budget is None else abs(think - budget) / budget
    raw = record.get(key)
    if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
        return None
    if key in RL_KEYS and record.get("rl_positions", 1) == 0:
        return None
    if key == "budget" and raw <= 0:
        return None
    if key == "ntp_loss" and record.get("ntp_tokens", 1) == 0:
        return None
    return float(raw)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the steps where it is defined."""
    pairs = [(int(r["step"]), value(r, key)) for r in rows]
    kept = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def quarters(rows: list) -> list[list]:
    """The rows split into four quarters (see the module docstring)."""
    n = len(rows)
    if n == 0:
        return [[], [], [], []]
    if n == 1:
        return [list(rows), [], [], []]
    q = math.ceil(n / 4)
    middle = rows[q : n - q]
    half = math.ceil(len(middle) / 2) if len(middle) > 1 else 0
    return [list(rows[:q]), list(middle[:half]), list(middle[half:]), list(rows[n - q :])]


def mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def variance(values: list[float]) -> float | None:
    """Sample variance (n - 1); None below 2 values."""
    if len(values) < 2:
        return None
    m = math.fsum(values) / len(values)
    return math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)


def welch(a: list[float], b: list[float], level: float = 0.95) -> dict | None:
    """mean(b) - mean(a) with its Welch interval: {"diff", "ci", "df", "se"}; None when a
    sample has fewer than 2 values. Equal, constant samples give a zero-width interval."""
    va, vb = variance(a), variance(b)
    if va is None or vb is None:
        return None
    diff = mean(b) - mean(a)
    sa, sb = va / len(a), vb / len(b)
    se = math.sqrt(sa + sb)
    if se == 0:
        return {"diff": diff, "ci": [diff, diff], "df": None, "se": 0.0}
    df = (sa + sb) ** 2 / (sa * sa / (len(a) - 1) + sb * sb / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return {"diff": diff, "ci": [diff - half, diff + half], "df": df, "se": se}


def paired(rows: list[dict], other: list[dict], key: str, level: float = 0.95) -> dict | None:
    """mean over the steps both runs logged of (this run's `key` - the other's), with a t
    interval over those per-step differences: runs that read the same windows in the same order
    (same seed and data) compare step by step, e.g. RMT's NTP loss against an NTP-only run's.
    {"diff", "ci", "steps"}; None with fewer than 2 common steps."""
    mine = dict(zip(*series(rows, key), strict=True))
    theirs = dict(zip(*series(other, key), strict=True))
    diffs = [mine[s] - theirs[s] for s in sorted(mine.keys() & theirs.keys())]
    var = variance(diffs)
    if var is None:
        return None
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * math.sqrt(var / len(diffs))
    d = mean(diffs)
    return {"diff": d, "ci": [d - half, d + half], "steps": len(diffs)}


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with df > 0 (not necessarily whole) degrees
    of freedom, by bisection on the CDF."""
    if not 0.5 <= p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def learning_stats(rows: list[dict], keys=DEFAULT_KEYS) -> dict:
    """First vs last quarter of `rows` (read_metrics' records) for every key present, and the
    budget deviation per step and per quarter."""
    parts = quarters(rows)
    out = {
        "steps": len(rows),
        "quarters": [_span(part) for part in parts],
        "metrics": {},
    }
    for key in keys:
        if not any(value(r, key) is not None for r in rows):
            continue  # absent from this run (e.g. reward in an NTP-only run)
        first = [v for r in parts[0] if (v := value(r, key)) is not None]
        last = [v for r in parts[3] if (v := value(r, key)) is not None]
        test = welch(first, last) if len(rows) > 1 else None
        out["metrics"][key] = {
            "first": mean(first),
            "last": mean(last),
            "n_first": len(first),
            "n_last": len(last),
            "diff": None if not first or not last or len(rows) < 2 else mean(last) - mean(first),
            "ci95": test and test["ci"],
            "df": test and test["df"],
        }
    steps, devs = series(rows, BUDGET_DEV)
    out["budget_deviation"] = {
        "per_step": [[s, d] for s, d in zip(steps, devs, strict=True)],
        "per_quarter": [
            mean([v for r in part if (v := value(r, BUDGET_DEV)) is not None]) for part in parts
        ],
        "overall": mean(devs),
    }
    return out


def _span(part: list[dict]) -> list[int] | None:
    return [int(part[0]["step"]), int(part[-1]["step"])] if part else None


def render(stats: dict, title: str | None = None) -> str:
    """The statistics as markdown: the first-vs-last table, then budget deviation by quarter."""
    spans = stats["quarters"]
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"| Metric | First quarter (steps {_steps(spans[0])}) | Last quarter (steps "
        f"{_steps(spans[3])}) | Last - first | 95% interval (Welch) |",
        "|---|---|---|---|---|",
    ]
    for key, m in stats["metrics"].items():
        ci = m["ci95"]
        interval = "-" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
        lines.append(
            f"| {key} | {_fmt(m['first'])} | {_fmt(m['last'])} | {_fmt(m['diff'], sign=True)} "
            f"| {interval} |"
        )
    dev = stats["budget_deviation"]
    if dev["per_step"]:
        lines += [
            "",
            "| Budget deviation | Q1 | Q2 | Q3 | Q4 | All steps |",
            "|---|---|---|---|---|---|",
        ]
        cells = [_fmt(v) for v in dev["per_quarter"]] + [_fmt(dev["overall"])]
        lines.append("| mean abs(think_len - B_t) / B_t | " + " | ".join(cells) + " |")
    lines += ["", f"{stats['steps']} steps."]
    return "\n".join(lines)


def _steps(span) -> str:
    return "-" if span is None else f"{span[0]}-{span[1]}"


def _fmt(x, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4g}" if sign else f"{x:.4g}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rmt.evaluation.learning",
        description="first vs last quarter of a training run's metrics, with 95% intervals",
    )
    parser.add_argument("metrics", help="a metrics JSONL file (--metrics-file of a run)")
    parser.add_argument("--json", default=None, help="also write the statistics here")
    parser.add_argument(
        "--keys",
        default=",".join(DEFAULT_KEYS),
        help=f"comma-separated metric names (default: {','.join(DEFAULT_KEYS)})",
    )
    parser.add_argument(
        "--against", default=None, help="another run's metrics: paired per-step differences"
    )
    parser.add_argument(
        "--against-keys",
        default="ntp_loss",
        help="comma-separated metrics compared with --against's run (default: ntp_loss)",
    )
    args = parser.parse_args(argv)
    rows = read_metrics(args.metrics)
    if not rows:
        raise InputError(f"{args.metrics}: no steps")
    stats = learning_stats(rows, [k for k in args.keys.split(",") if k])
    stats["file"] = args.metrics
    print(render(stats, args.metrics), flush=True)
    if args.against:
        other = read_metrics(args.against)
        for key in [k for k in args.against_keys.split(",") if k]:
            d = stats[f"{key}_vs"] = paired(rows, other, key)
            if d is not None:
                print(
                    f"\n{key} minus {args.against}'s over the same {d['steps']} steps: "
                    f"{_fmt(d['diff'], sign=True)} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=1)
    return stats


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
