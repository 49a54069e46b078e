import json
import math
import sys

for path in sys.argv[1:]:
    p = json.load(open(path))["per_position"]
    for right in (1, 0):
        idx = [i for i, c in enumerate(p["ntp"]) if c == right]
        ntr = sum(p["ntr"][i] for i in idx) / len(idx)
        pt = sum(math.exp(-p["ntp_loss"][i]) for i in idx) / len(idx)
        print(
            f"{path.split('/')[-1]:<16} NTP {'right' if right else 'wrong'}: n {len(idx)}, NTR {100 * ntr:.1f}%, mean p(true) {100 * pt:.1f}%"
        )
