"""Training curves of several runs side by side, from their metrics JSONL files.

    python tools/plot_runs.py --runs rmt=runs/rmt/metrics.jsonl ntp=runs/ntp/metrics.jsonl \\
        --output plots/ [--smooth 5]

One PNG per quantity, one line per run (variant), steps on the x axis:
- reward.png: mean reward (solid) and match accuracy (dashed)
- think_len.png: mean thinking length (solid) and the token budget B_t (dashed)
- entropy_chosen.png: mean entropy of the chosen (RL) positions
- ntp_loss.png: NTP loss
`--smooth K` draws the moving average over the last K logged steps (the raw values stay, faint).
A run without a quantity (an NTP-only run has no reward, a run without DTB no B_t) simply has no
line in that figure; a figure no run has is not written. Which values count is
megatron_rmt.evaluation.learning's rule (e.g. steps without RL positions have no reward).
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_rmt.evaluation.learning import read_metrics, series  # noqa: E402
from megatron_rmt.jsonl import InputError  # noqa: E402

# file name -> (title, y label, [(metric key, line style, legend suffix)])
FIGURES = {
    "reward": (
        "Reward and match accuracy",
        "mean over samples",
        [("reward", "-", "reward"), ("match_acc", "--", "match acc")],
    ),
    "think_len": (
        "Thinking length and budget B_t",
        "tokens",
        [("think_len", "-", "think len"), ("budget", "--", "B_t")],
    ),
    "entropy_chosen": (
        "Entropy of the chosen positions",
        "nats",
        [("entropy_chosen", "-", "entropy")],
    ),
    "ntp_loss": ("NTP loss", "nats / token", [("ntp_loss", "-", "ntp loss")]),
}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    runs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --runs takes NAME=METRICS.jsonl, got {spec!r}")
        runs.append((name, path))
    return runs


def plot(runs: list[tuple[str, list[dict]]], output: str, smooth: int = 1) -> list[str]:
    """Writes the figures (see the module docstring) under `output`; returns their paths."""
    os.makedirs(output, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for stem, (title, ylabel, lines) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = 0
        for index, (name, rows) in enumerate(runs):
            colour = colours[index % len(colours)]
            for key, style, label in lines:
                steps, values = series(rows, key)
                if not steps:
                    continue  # this run has no such quantity
                suffix = f" {label}" if len(lines) > 1 else ""
                if smooth > 1:
                    ax.plot(steps, values, style, color=colour, alpha=0.25, linewidth=0.8)
                    values = moving_average(values, smooth)
                ax.plot(steps, values, style, color=colour, label=f"{name}{suffix}")
                drawn += 1
        if drawn:
            ax.set_title(title + (f" (moving average of {smooth})" if smooth > 1 else ""))
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = os.path.join(output, f"{stem}.png")
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, metavar="NAME=METRICS.jsonl", help="runs to compare"
    )
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving average over K steps (default 1: none)"
    )
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    runs = [(name, read_metrics(path)) for name, path in parse_runs(args.runs)]
    written = plot(runs, args.output, args.smooth)
    for path in written:
        print(path)
    if not written:
        print("no figure: none of the runs logged these metrics", file=sys.stderr)
    return written


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
