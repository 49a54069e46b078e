"""Per-level accuracies of one model, their 95% intervals, and the side-by-side table of several
(the paper's Table 1 / Table 4 shape).

Numbers are fractions in the results file and percentages in the table. "avg" is the mean of the
three levels' accuracies, as the paper's "Average" column is (31.13 = mean of 42.04, 31.71,
19.64); "all" is the accuracy over every position. A level with no positions has accuracy None,
shown as "-", and is left out of "avg".

Intervals are over positions, 95%:
- NTP: each position is right or wrong (0/1), so the Wilson score interval of k right out of n.
- NTR: each position's pass@1 is a mean over its G samples, so a normal interval over the
  per-position means, mean +- 1.96 sd / sqrt(n) (sd with n - 1, clipped to [0, 1]); the results
  file keeps that sd as `accuracy_sd`.
- avg: the levels are independent samples, so a normal interval with
  se(avg) = sqrt(sum of the levels' se^2) / (number of levels).
A results file written before these fields existed still renders; its NTR intervals show "-".
"""

import json
import math

import torch

from megatron_rmt.jsonl import InputError
from megatron_rmt.selection import LEVELS

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k / n; None when n == 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k <= 0 else lo), (1.0 if k >= n else hi)


def normal_interval(
    mean: float | None, sd: float | None, n: int, z: float = Z95
) -> tuple[float, float] | None:
    """mean +- z sd / sqrt(n), clipped to [0, 1] (accuracies); None without sd or n < 2."""
    if mean is None or sd is None or n < 2:
        return None
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def summarize_ntp(levels: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor) -> dict:
    """levels, correct (bool), loss (nats): `[n]` per position."""
    out = {}
    for name, keep in _groups(levels):
        n = int(keep.sum())
        accuracy = float(correct[keep].double().mean()) if n else None
        out[name] = {
            "n": n,
            "accuracy": accuracy,
            "loss": float(loss[keep].double().mean()) if n else None,
            "ci95": _list(wilson(float(correct[keep].sum()), n)),
        }
    return _with_avg(out, "ntp")


def summarize_ntr(
    levels: torch.Tensor,  # [n]
    match: torch.Tensor,  # [n, G] 0/1
    think_tokens: torch.Tensor,  # [n, G]
    response_tokens: torch.Tensor,  # [n, G]
    unparsed: torch.Tensor,  # [n, G] bool
) -> dict:
    """pass@1 (mean over the G samples, then over positions) with the sd of the per-position
    pass@1 and its interval, mean lengths and the share of responses with no readable
    prediction, per level."""
    per_position = match.double().mean(dim=-1) if match.dim() > 1 else match.double()
    out = {}
    for name, keep in _groups(levels):
        n = int(keep.sum())
        mean = (lambda t, keep=keep: float(t[keep].double().mean())) if n else (lambda t: None)
        accuracy = mean(match)
        sd = float(per_position[keep].std(unbiased=True)) if n > 1 else None
        out[name] = {
            "n": n,
            "accuracy": accuracy,
            "accuracy_sd": sd,
            "ci95": _list(normal_interval(accuracy, sd, n)),
            "response_tokens": mean(response_tokens),
            "think_tokens": mean(think_tokens),
            "parse_failures": mean(unparsed),
        }
    return _with_avg(out, "ntr")


def _groups(levels: torch.Tensor):
    for index, name in enumerate(LEVELS):
        yield name, levels == index
    yield "all", torch.ones_like(levels, dtype=torch.bool)


def _with_avg(out: dict, setting: str | None = None) -> dict:
    present = [out[name]["accuracy"] for name in LEVELS if out[name]["accuracy"] is not None]
    out["avg"] = sum(present) / len(present) if present else None
    if setting is not None:
        out["avg_ci95"] = _list(avg_interval(out, setting))
    return out


def level_interval(table: dict, level: str, setting: str) -> tuple[float, float] | None:
    """The 95% interval of one level's accuracy ("ntp": Wilson, "ntr": normal over positions),
    from the fields a results file has; None where they are missing."""
    entry = (table or {}).get(level) or {}
    n, accuracy = entry.get("n") or 0, entry.get("accuracy")
    if accuracy is None or not n:
        return None
    if setting == "ntp":
        return wilson(accuracy * n, n)
    return normal_interval(accuracy, entry.get("accuracy_sd"), n)


def _standard_error(entry: dict, setting: str) -> float | None:
    n, accuracy = entry.get("n") or 0, entry.get("accuracy")
    if setting == "ntp":
        return math.sqrt(accuracy * (1 - accuracy) / n) if n else None
    sd = entry.get("accuracy_sd")
    return sd / math.sqrt(n) if sd is not None and n > 1 else None


def avg_interval(table: dict | None, setting: str) -> tuple[float, float] | None:
    """Normal 95% interval of "avg" (the mean of the levels present), or None."""
    if not table or table.get("avg") is None:
        return None
    errors = [
        _standard_error(table[level], setting)
        for level in LEVELS
        if table.get(level, {}).get("accuracy") is not None
    ]
    if not errors or any(se is None for se in errors):
        return None
    half = Z95 * math.sqrt(sum(se * se for se in errors)) / len(errors)
    return max(0.0, table["avg"] - half), min(1.0, table["avg"] + half)


def _list(interval):
    return None if interval is None else list(interval)


CAPTION = (
    "Accuracy % [95% interval over positions: Wilson for NTP, normal over per-position pass@1 "
    "for NTR, normal for Average]; think / response length in tokens (NTR)."
)


def render_table(results: list[dict], flops: dict[str, float] | None = None) -> str:
    """Markdown in the paper's Table 1 shape: for every results dict (as `evaluate run` writes
    them) a row "NAME (NTP)" and, when it has NTR results, "NAME (NTR)", with the accuracy (%)
    and its 95% interval on easy / medium / hard positions and their average, then (NTR rows)
    the mean thinking and response length, the unparsed share and the positions evaluated;
    a caption line below says which intervals these are. `flops` (name -> training FLOPs, see
    `parse_flops`) adds a last column, "-" for a name it lacks."""
    head = ["Model", "Easy", "Medium", "Hard", "Average"]
    head += ["Think len", "Resp. len", "Unparsed %", "Positions"]
    head += ["Training FLOPs"] if flops else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for setting in ("ntp", "ntr"):
            table = r.get(setting)
            if setting == "ntr" and table is None:
                continue
            cells = [f"{r['name']} ({setting.upper()})"]
            for level in LEVELS:
                cells.append(_cell(_acc(table, level), level_interval(table, level, setting)))
            cells.append(_cell(table and table.get("avg"), avg_interval(table, setting)))
            every = (table or {}).get("all") or {}
            if setting == "ntr":
                cells += [_num(every.get("think_tokens"), 1), _num(every.get("response_tokens"), 1)]
                cells.append(_pct(every.get("parse_failures")))
            else:
                cells += ["-", "-", "-"]
            cells.append(str(every["n"]) if every.get("n") is not None else "-")
            cells += [flops_cell(flops.get(r["name"]))] if flops else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + CAPTION


def parse_flops(pairs: list[str]) -> dict[str, float]:
    """`NAME=VALUE` pairs (a table's `--flops`); a malformed one is an input error naming it."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InputError(f"--flops {pair!r}: expected NAME=NUMBER, e.g. rmt=3.1e14")
    return out


def flops_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _cell(value, interval) -> str:
    if value is None:
        return "-"
    if interval is None:
        return f"{100 * value:.2f} [-]"
    return f"{100 * value:.2f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _acc(table: dict | None, level: str):
    return None if table is None else (table.get(level) or {}).get("accuracy")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def read_results(path: str) -> dict:
    """A results file from `run`; `FILE:LINE: problem` when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            results = json.load(fh)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(results, dict) or not {"name", "ntp", "ntr"} <= results.keys():
        raise InputError(f"{path}:1: not a results file of `evaluate run` (name, ntp, ntr)")
    return results


def show(text: str, output: str | None) -> None:
    """A rendered table on stdout, and in `output` too when one is given."""
    print(text)
    if output:
        with open(output, "w") as fh:
            fh.write(text + "\n")
