"""Paired comparisons on one evaluation set: the difference (or ratio) of two accuracies measured
on the same positions, with a 95% bootstrap interval over positions.

Two checkpoints scored on the same positions (or NTR and NTP of one checkpoint) are not
independent samples: a hard position is hard for both. Resampling positions, and taking the same
resampled positions for both sides, keeps that pairing, so the interval of the difference is
much narrower than two separate intervals would suggest (and honest where they overlap).

    delta = mean_i b_i - mean_i a_i          (or ratio = mean_i b_i / mean_i a_i)
    for r in 1..R: draw n position indices with replacement (one shared draw for a and b),
                   delta_r = mean over the draw of b - mean over the draw of a
    interval = the 2.5% and 97.5% percentiles of delta_1..delta_R

Per-position values are 0/1 for NTP (greedy == true token) and pass@1 in [0, 1] for NTR (the
mean over the position's G samples).

Deliberate choices:
- Percentile bootstrap, R = 10,000 resamples by default, one `torch.Generator` seeded with
  `seed`: results are reproducible bit for bit; all R draws are made at once as an `[R, n]`
  index matrix (n is hundreds, so that is a few MB).
- Quantiles by linear interpolation between order statistics (numpy's default), which keeps
  +inf resamples of a ratio as +inf instead of NaN.
- A ratio whose denominator is 0 in a resample counts as +inf there (it can only widen the
  interval); the point estimate of a ratio with a zero denominator is None.
- `compare` reads results files of `evaluate run`, which keep the per-position values in
  `per_position`; the two files must be scored on the same set (same header, same positions
  in the same order; the set file's path may differ).
"""

import argparse
import sys

import torch

from megatron_rmt.jsonl import InputError

RESAMPLES = 10_000


def resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """`[resamples, n]` int64: position indices drawn with replacement, one row per resample."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=g)


def _means(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # [n], [R, n] -> [R]
    return values.double()[idx].mean(dim=1)


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of `[R]` values by linear interpolation between order statistics (numpy's
    default); an infinite neighbour gives inf unless q falls exactly on the finite one."""
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    frac = pos - lo
    a, b = float(ordered[lo]), float(ordered[hi])
    if frac == 0 or a == b:
        return a
    return a + (b - a) * frac


def paired_bootstrap(
    a: torch.Tensor,  # [n] per-position values of the first side (e.g. the earlier checkpoint)
    b: torch.Tensor,  # [n] the same positions, second side
    statistic: str = "difference",  # "difference": mean b - mean a; "ratio": mean b / mean a
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The statistic on all positions and its percentile interval over paired resamples:
    {"estimate", "ci95": [lo, hi], "n", "resamples", "seed", "statistic"}."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired values need the same non-zero length: {a.shape} vs {b.shape}")
    idx = resample_indices(a.numel(), resamples, seed)
    ma, mb = _means(a, idx), _means(b, idx)  # [R] each
    if statistic == "difference":
        stats, estimate = mb - ma, float(b.mean() - a.mean())
    elif statistic == "ratio":
        stats = torch.where(ma > 0, mb / ma.clamp_min(1e-300), torch.full_like(ma, float("inf")))
        estimate = float(b.mean() / a.mean()) if float(a.mean()) > 0 else None
    else:
        raise ValueError(f"statistic must be 'difference' or 'ratio', not {statistic!r}")
    tail = (1 - level) / 2
    lo, hi = percentile(stats, tail), percentile(stats, 1 - tail)
    return {
        "statistic": statistic,
        "estimate": estimate,
        "ci95": [lo, hi],
        "n": a.numel(),
        "resamples": resamples,
        "seed": seed,
    }


def per_position(results: dict, key: str) -> torch.Tensor:
    """`[n]` values of one results file: key "ntp" (0/1 correct), "ntr" (pass@1) or "ntp_loss"."""
    rows = results.get("per_position")
    if not rows or key not in rows or rows[key] is None:
        raise InputError(f"{results.get('name')}: results without per_position[{key!r}]")
    return torch.tensor(rows[key], dtype=torch.float64)


def _same_set(a: dict, b: dict) -> None:
    pa, pb = a.get("per_position") or {}, b.get("per_position") or {}
    # The set's header and positions, not its path: a set copied to another run is the same set.
    if a.get("set_header") != b.get("set_header") or pa.get("positions") != pb.get("positions"):
        raise InputError(f"{a.get('name')} and {b.get('name')} were not scored on the same set")


def comparisons(a: dict, b: dict, resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Paired differences between two results files (b - a) on NTP accuracy and NTR pass@1,
    and within each, NTR against NTP (difference and ratio)."""
    _same_set(a, b)
    out = []

    def add(label, x, y, statistic):
        out.append({"label": label, **paired_bootstrap(x, y, statistic, resamples, seed)})

    add(f"NTP acc: {b['name']} - {a['name']}", per_position(a, "ntp"), per_position(b, "ntp"),
        "difference")  # fmt: skip
    if (a.get("per_position") or {}).get("ntr") and (b.get("per_position") or {}).get("ntr"):
        add(f"NTR pass@1: {b['name']} - {a['name']}", per_position(a, "ntr"),
            per_position(b, "ntr"), "difference")  # fmt: skip
    for r in (a, b):
        if (r.get("per_position") or {}).get("ntr"):
            add(f"{r['name']}: NTR - NTP", per_position(r, "ntp"), per_position(r, "ntr"),
                "difference")  # fmt: skip
            add(f"{r['name']}: NTR / NTP", per_position(r, "ntp"), per_position(r, "ntr"), "ratio")
    return out


def render(rows: list[dict]) -> str:
    """Markdown: one line per comparison, the estimate and its paired 95% interval."""
    lines = ["| Paired comparison (same positions) | Estimate | 95% interval (bootstrap) | n |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        scale, unit = (1, "") if r["statistic"] == "ratio" else (100, " pt")
        est = "-" if r["estimate"] is None else f"{scale * r['estimate']:+.2f}{unit}"
        if r["statistic"] == "ratio" and r["estimate"] is not None:
            est = f"{r['estimate']:.3f}"
        lo, hi = (scale * v for v in r["ci95"])
        digits = 3 if r["statistic"] == "ratio" else 2
        lines.append(f"| {r['label']} | {est} | [{lo:.{digits}f}, {hi:.{digits}f}] | {r['n']} |")
    return "\n".join(lines) + (
        f"\n\nPercentile bootstrap over positions, {rows[0]['resamples']} paired resamples, "
        f"seed {rows[0]['seed']}; differences in percentage points."
        if rows
        else ""
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m megatron_rmt.evaluation.paired",
        description="paired bootstrap intervals between two results files of `evaluate run`",
    )
    p.add_argument("first", help="results JSON (e.g. the earlier checkpoint)")
    p.add_argument("second", help="results JSON of the same set")
    p.add_argument("--resamples", type=int, default=RESAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    from megatron_rmt.evaluation.report import read_results, show

    first, second = read_results(args.first), read_results(args.second)
    show(render(comparisons(first, second, args.resamples, args.seed)), args.output)


if __name__ == "__main__":
    from megatron_rmt.config import run_cli

    run_cli(main, sys.argv[1:])
