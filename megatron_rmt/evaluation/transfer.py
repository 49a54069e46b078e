"""Does a checkpoint's next-token reasoning carry its next-token prediction? One table row per
checkpoint, all scored on the same evaluation set:

    NTP top-1 | NTR pass@1 | NTR / NTP with its paired 95% interval | NTR - NTP [95%] |
    mean p(true) (/ NTP top-1) | unreadable | held-out NTP loss and its change against a base
    checkpoint's [| training FLOPs spent since the common start, with `--flops NAME=VALUE ...`]

Mean p(true) is the checkpoint's own next-token probability of the true token, averaged over the
positions (exp of minus each position's NTP loss): the pass@1 of a reasoner that, at temperature
1, samples its answer from the model's plain next-token distribution. Reasoning beats it only by
sharpening that distribution (picking the most probable candidate, as the prompt asks); NTP
top-1 is the pass@1 of a perfectly sharpened one.

The cold start's targets (docs/coldstart.md): NTR / NTP >= 0.8 and the held-out NTP loss at most
2% above the base's. The ratio's interval is evaluation/paired.py's bootstrap over positions
(NTR and NTP of the same checkpoint on the same positions).

    python -m megatron_rmt.evaluation.transfer --base-loss BASE.loss.json A.json B.json ... \
        [--flops A=3.1e14 B=...]

Each results file `X.json` (evaluate run) may have its held-out loss beside it, `X.loss.json`
(evaluation/text_loss.py); without one the loss cells show "-".
"""

import argparse
import json
import os
import sys

from megatron_rmt.evaluation import paired, report

RATIO_TARGET = 0.8  # NTR pass@1 >= 0.8 x NTP top-1
LOSS_TARGET = 0.02  # held-out NTP loss rises by at most 2%


def loss_beside(results_path: str) -> float | None:
    path = results_path[: -len(".json")] + ".loss.json"
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return float(json.load(fh)["loss"])


def row(results: dict, loss: float | None, base_loss: float | None, seed: int = 0) -> dict:
    """The numbers of one checkpoint (fractions; the loss change relative)."""
    ntp, ntr = paired.per_position(results, "ntp"), paired.per_position(results, "ntr")
    ratio = paired.paired_bootstrap(ntp, ntr, "ratio", seed=seed)
    diff = paired.paired_bootstrap(ntp, ntr, "difference", seed=seed)
    change = None if loss is None or base_loss is None else loss / base_loss - 1
    p_true = None
    if results["per_position"].get("ntp_loss"):  # older results files have no NTP losses
        p_true = float(paired.per_position(results, "ntp_loss").neg().exp().mean())
    return {
        "name": results["name"],
        "n": ratio["n"],
        "ntp": float(ntp.mean()),
        "ntr": float(ntr.mean()),
        "ratio": ratio["estimate"],
        "ratio_ci95": ratio["ci95"],
        "difference_ci95": diff["ci95"],
        "p_true": p_true,
        "unparsed": results["ntr"]["all"]["parse_failures"],
        "loss": loss,
        "loss_change": change,
        "meets": (ratio["estimate"] or 0) >= RATIO_TARGET
        and change is not None
        and change <= LOSS_TARGET,
    }


def render(rows: list[dict], base_loss: float | None, flops: dict | None = None) -> str:
    """The table; `flops` (checkpoint name -> training FLOPs) adds a column, "-" where absent."""
    head = "| Checkpoint | NTP top-1 | NTR pass@1 | NTR / NTP [95%] | NTR - NTP, pt [95%] |"
    head += " Mean p(true) (/ NTP) | Unreadable | Held-out NTP loss (change) | Both targets |"
    head += " Training FLOPs |" if flops else ""
    lines = [head, "|" + "---|" * (10 if flops else 9)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lo, hi = r["ratio_ci95"]
        dlo, dhi = (100 * v for v in r["difference_ci95"])
        p_true = "-"
        if r["p_true"] is not None:
            p_true = f"{100 * r['p_true']:.2f}%"
            p_true += f" ({r['p_true'] / r['ntp']:.3f})" if r["ntp"] else ""
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        if r["loss_change"] is not None:
            loss += f" ({100 * r['loss_change']:+.2f}%)"
        lines.append(
            f"| {r['name']} | {100 * r['ntp']:.2f}% | {100 * r['ntr']:.2f}% | {ratio} "
            f"[{lo:.3f}, {hi:.3f}] | {100 * (r['ntr'] - r['ntp']):+.2f} [{dlo:.2f}, {dhi:.2f}] "
            f"| {p_true} | {100 * r['unparsed']:.1f}% | {loss} | {'yes' if r['meets'] else 'no'} |"
            + (f" {report.flops_cell(flops.get(r['name']))} |" if flops else "")
        )
    n = rows[0]["n"] if rows else 0
    base = "-" if base_loss is None else f"{base_loss:.4f}"
    return "\n".join(lines) + (
        f"\n\n{n} held-out positions, the same for every row; intervals: paired percentile "
        f"bootstrap over positions ({paired.RESAMPLES} resamples). Targets: NTR / NTP >= "
        f"{RATIO_TARGET}, held-out NTP loss at most {100 * LOSS_TARGET:.0f}% above the base's "
        f"({base})."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_rmt.evaluation.transfer")
    p.add_argument("results", nargs="+", help="results JSON files of `evaluate run`")
    p.add_argument("--base-loss", default=None, help="the base checkpoint's X.loss.json")
    p.add_argument("--output", default=None, help="also write the markdown here")
    p.add_argument("--flops", nargs="*", default=[], help="NAME=FLOPS: a training-FLOPs column")
    args = p.parse_args(argv)
    flops = report.parse_flops(args.flops)

    base = None
    if args.base_loss:
        with open(args.base_loss) as fh:
            base = float(json.load(fh)["loss"])
    rows = [row(report.read_results(path), loss_beside(path), base) for path in args.results]
    report.show(render(rows, base, flops), args.output)


if __name__ == "__main__":
    from megatron_rmt.config import run_cli

    run_cli(main, sys.argv[1:])
