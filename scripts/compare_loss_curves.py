#!/usr/bin/env python3
"""Compare two training runs' loss curves: compare_loss_curves.py A/metrics.jsonl B/metrics.jsonl.
Prints the number of common records, the largest relative lm_loss difference over them and the
last losses; exits 1 when a file has no lm_loss record or the steps do not line up."""
import json
import sys


def losses(path):
    try:
        with open(path) as f:
            recs = [json.loads(line) for line in f if '"lm_loss"' in line]
    except OSError as e:
        sys.exit(f"compare_loss_curves: cannot read {path}: {e.strerror} (did that run finish?)")
    if not recs:
        sys.exit(f"compare_loss_curves: {path} has no lm_loss record (did that run log any step?)")
    return {r["iter"]: r["lm_loss"] for r in recs} if "iter" in recs[0] else dict(enumerate(r["lm_loss"] for r in recs))


if len(sys.argv) != 3:
    sys.exit("usage: compare_loss_curves.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl")
a, b = losses(sys.argv[1]), losses(sys.argv[2])
common = sorted(set(a) & set(b))
if not common:
    sys.exit("compare_loss_curves: the two runs have no logged step in common")
d = max(abs(a[k] - b[k]) / abs(b[k]) for k in common)
print(f"{len(common)} common records; largest relative lm_loss difference {d:.3e}; "
      f"last {a[common[-1]]:.4f} vs {b[common[-1]]:.4f}")
