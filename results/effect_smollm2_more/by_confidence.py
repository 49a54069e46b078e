"""NTR pass@1 against the checkpoint's own confidence in the true token, from the stored
per-position scores of an evaluation JSON (no model run): positions binned by p(true) =
exp(-NTP loss at the position). A reasoner that carried its prediction over faithfully would
score about p(true) in every bin (the mean p(true) ceiling); where NTR stays flat at high
p(true), the samples are lost in the format (think -> box), not in the prediction.
    python results/effect_smollm2_more/by_confidence.py EVAL.json [EVAL.json ...]
Output for the fourth cold start, RMT from it and the fifth cold start: by_confidence.txt."""

import json
import math
import sys

BINS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))

for path in sys.argv[1:]:
    scores = json.load(open(path))["per_position"]
    p = [math.exp(-loss) for loss in scores["ntp_loss"]]
    ntr, ntp = scores["ntr"], scores["ntp"]
    print(f"{path}: {len(p)} positions, mean p(true) {sum(p) / len(p):.3f}, "
          f"NTR pass@1 {sum(ntr) / len(ntr):.3f}")  # fmt: skip
    print(f"  {'p(true)':<12}{'positions':>10}{'mean p':>8}{'NTR':>6}{'NTP':>6}")
    for low, high in BINS:
        idx = [i for i, x in enumerate(p) if low <= x < high]
        mean = [sum(v[i] for i in idx) / len(idx) for v in (p, ntr, ntp)]
        print(f"  {f'[{low}, {min(high, 1.0)})':<12}{len(idx):>10}" + "".join(
            f"{m:>{w}.2f}" for m, w in zip(mean, (8, 6, 6), strict=True)))  # fmt: skip
