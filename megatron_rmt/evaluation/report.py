"""Per-level accuracies of one model, and the side-by-side table of several (paper Table 1).

Numbers are fractions in the results file and percentages in the table. "avg" is the mean of the
three levels' accuracies, as the paper's "Average" column is (31.13 = mean of 42.04, 31.71,
19.64); "all" is the accuracy over every position. A level with no positions has accuracy None,
shown as "-", and is left out of "avg".
"""

import torch

from megatron_rmt.selection import LEVELS


def summarize_ntp(levels: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor) -> dict:
    """levels, correct (bool), loss (nats): `[n]` per position."""
    out = {}
    for name, keep in _groups(levels):
        n = int(keep.sum())
        out[name] = {
            "n": n,
            "accuracy": float(correct[keep].double().mean()) if n else None,
            "loss": float(loss[keep].double().mean()) if n else None,
        }
    return _with_avg(out)


def summarize_ntr(
    levels: torch.Tensor,  # [n]
    match: torch.Tensor,  # [n, G] 0/1
    think_tokens: torch.Tensor,  # [n, G]
    response_tokens: torch.Tensor,  # [n, G]
    unparsed: torch.Tensor,  # [n, G] bool
) -> dict:
    """pass@1 (mean over the G samples, then over positions), mean lengths and the share of
    responses with no readable prediction, per level."""
    out = {}
    for name, keep in _groups(levels):
        n = int(keep.sum())
        mean = (lambda t, keep=keep: float(t[keep].double().mean())) if n else (lambda t: None)
        out[name] = {
            "n": n,
            "accuracy": mean(match),
            "response_tokens": mean(response_tokens),
            "think_tokens": mean(think_tokens),
            "parse_failures": mean(unparsed),
        }
    return _with_avg(out)


def _groups(levels: torch.Tensor):
    for index, name in enumerate(LEVELS):
        yield name, levels == index
    yield "all", torch.ones_like(levels, dtype=torch.bool)


def _with_avg(out: dict) -> dict:
    present = [out[name]["accuracy"] for name in LEVELS if out[name]["accuracy"] is not None]
    out["avg"] = sum(present) / len(present) if present else None
    return out


def render_table(results: list[dict]) -> str:
    """Markdown: one row per results dict (as `evaluate run` writes them), NTP and NTR accuracy
    (%) per level and their average, then NTR response and thinking length and parse failures."""
    head = ["Model"]
    head += [f"NTP {c}" for c in (*LEVELS, "avg")] + [f"NTR {c}" for c in (*LEVELS, "avg")]
    head += ["Resp. len", "Think len", "Unparsed %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"]]
        for setting in ("ntp", "ntr"):
            table = r.get(setting)
            cells += [_pct(_acc(table, c)) for c in LEVELS] + [_pct(table and table["avg"])]
        ntr_all = (r.get("ntr") or {}).get("all", {})
        cells += [_num(ntr_all.get("response_tokens"), 1), _num(ntr_all.get("think_tokens"), 1)]
        cells.append(_pct(ntr_all.get("parse_failures")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _acc(table: dict | None, level: str):
    return None if table is None else table[level]["accuracy"]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
